"""The engines that run an artifact's networks and apply its score to a batch.

`numpy_engine.NumpyScorer` runs a dense autoencoder from `dense_stack.npz` (no TensorFlow);
`keras_engine.KerasScorer` runs any Keras model, importing TensorFlow only when it is built.
`detector.loading.make_scorer` picks one.
"""
