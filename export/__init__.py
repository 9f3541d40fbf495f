"""Export of the served sub-networks (installed as liveportrait_triton.export).

served.py wraps each network with the spec's I/O order, onnx_export.py writes and validates ONNX files
(validate.py holds the checks and tolerances), sample_inputs.py generates realistic inputs, tensorrt_build.py
builds and checks TensorRT engines; cli.py and tensorrt_cli.py are the `export` and `tensorrt` commands.
"""
