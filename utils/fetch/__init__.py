"""Downloading: HTTP sessions, retries, the address policy and the deadline (``http``), one
verified image (``images``), the images of a CSV (``image_set``), the asset manifest
(``assets``) and fetching the assets (``asset_fetch``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "http": "open_session",
        "images": "DEFAULT_MAX_BYTES FetchResult download_one",
        "image_set": "ImageJob download_images image_summary",
        "assets": "DEFAULT_MANIFEST ROOT Asset HashRecords load_manifest select_assets",
        "asset_fetch": "fetch_assets",
    },
)
