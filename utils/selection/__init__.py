"""Selection on a user's catalogue: the catalogue, statuses, image resolution and output
rows (``catalogue``); what a run is, the steps both runners share and the local runner
(``run``); the Ray runner (``ray_runner``): joining the cluster (``session``), the
catalogue read on it (``cluster``), its shard files (``shards``) on a path or a
filesystem URI (``store``). The runners
take the model loader and the block scoring (``models.engine``) as plain functions."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "catalogue": "DOWNLOAD_FAILED DUPLICATE Item MISSING OK OUTPUT_HEADER STATUSES UNREADABLE mark_duplicates "
        "output_rows read_catalogue resolve_images write_output",
        "run": "Catalogue Clock ModelFiles RayOptions Scoring Selection check_rows read_items run_local",
        "ray_runner": "run_on_ray",
        "session": "connect_ray",
        "store": "is_uri",
    },
)
