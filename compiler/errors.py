"""Every error momentprop raises on bad input derives from :class:`MomentpropError`."""


class MomentpropError(Exception):
    """Base class: catch this to handle any momentprop error."""


class PosteriorError(MomentpropError, ValueError):
    """The posterior does not fit the model (unknown name, wrong shape or length, invalid variance)."""


class InputError(MomentpropError, ValueError):
    """The example inputs (or the inputs at run time) are missing or do not fit the model."""


class CaptureError(MomentpropError, RuntimeError):
    """torch.export could not capture the model."""


class UnsupportedOpError(MomentpropError, NotImplementedError):
    """An op reached by random values has no moment rule."""


class PersistenceError(MomentpropError, ValueError):
    """A file is not a momentprop file (or not of the expected kind), is truncated or corrupt, or cannot be written."""


class CalibrationError(MomentpropError, ValueError):
    """The variance scale could not be fitted (non-finite NLPD for every scale)."""


class ProviderError(MomentpropError, RuntimeError):
    """The requested ONNX Runtime execution provider (CUDA) is not available in this installation."""
