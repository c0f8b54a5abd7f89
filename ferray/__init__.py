"""ferray: facial-expression recognition on FER2013, as a Ray experiment platform.

Importing ferray does no work: no Ray start, no folders, no weights. The compute core (models,
losses, augmentation, SR, engine, metrics) imports no Ray, so it runs on machines that have only
PyTorch.
"""

__version__ = "0.1.0"


def load(bundle=None, device=None, int8=False, members="all"):
    """A predictor for a serving bundle; None: the model that ships with ferray. members="fast":
    the bundle's fast set (Model A alone in the shipped ensemble); a set name or a comma list of
    member names answers with those members. See ferray.api."""
    from ferray.api import load as _load

    return _load(bundle, device, int8, members)
