"""Selection on a user's catalogue: the catalogue (``catalogue``), a run and the local
runner (``run``), the Ray runner (``ray_runner``: Ray in ``cluster``, the outputs in
``shards``). The runners take the model loader and scoring as functions."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "catalogue": "DUPLICATE OK UNREADABLE is_parquet",
        "run": "Clock ModelFiles RayOptions Scoring Selection run_local",
        "ray_runner": "run_on_ray",
        "cluster": "connect_ray",
        "shards": "is_uri",
    },
)
