"""What every model family's export shares: the family descriptor, checkpoint loading, sign-0 weights, the ONNX graph
machinery and function bodies, and the validation harness."""
