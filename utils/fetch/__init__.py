"""Downloading: HTTP sessions with retries, the address policy and the deadline (``http``),
verified image downloads (``images``), the images of a published CSV (``image_set``:
download_images.py), the asset manifest and its checks (``assets``) and fetching the
assets (``asset_fetch``: download_assets.py)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "http": "AddressPolicy Deadline make_session open_session",
        "images": "DEFAULT_MAX_BYTES FetchResult download_one",
        "image_set": "ImageJob download_images image_summary plan_images run_images",
        "assets": "AssetError DEFAULT_MANIFEST HASHES_FILE ROOT Asset HashRecords check_present load_manifest "
        "select_assets",
        "asset_fetch": "fetch_assets hf_endpoint",
    },
)
