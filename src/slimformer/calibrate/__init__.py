"""Calibration: the layer-wise engine (`engine`), the statistics it collects from each layer's
inputs (`collectors`) and the Hessian math GPTQ and SparseGPT share (`hessian_math`)."""
