"""Export of the served sub-networks. This top-level folder is installed as the package `liveportrait_triton.export`
(pyproject.toml `package-dir`), so its modules import the rest of the package relatively (`from .. import spec`).

onnx_export.py traces each network's served graph (liveportrait_triton/networks/served.py) into ONNX and validates
it (validate.py holds the checks and tolerances) on the runners of the runtime plan, sample_inputs.py generates
realistic inputs, tensorrt_build.py builds and checks TensorRT engines; cli.py and tensorrt_cli.py are the `export`
and `tensorrt` commands. The exporter looks down at the runtime layer and the networks; nothing on the server side
imports it.
"""
