"""TensorRT engines from bundles: optimisation profiles from the manifest, the strongly typed
builder, and the engine manifest that ties engines to their TensorRT version, GPU and source ONNX.
TensorRT itself is imported only by the builder and the runtime backend, when they run."""
