"""The F-SAM paper's evidence in the small: ``fsam-study`` (training curves, the perturbation
probes, the Hessian spectrum at the end of training, on scikit-learn's digits) and the
Hessian-vector-product count of Lanczos against power iteration (``hvp_count``)."""
