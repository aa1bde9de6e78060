"""The one error a DataModule raises when its files are missing or unusable."""


class DatasetNotFoundError(FileNotFoundError):
    """No usable copy of a dataset was found.

    Raised by ``prepare_data()`` and ``setup()`` both when the files are absent and when
    they are present but unusable (only some of them, truncated, or of the wrong kind).
    The message lists every place that was searched and every way to get the data, and
    names the Hydra key ``data.root``.
    """
