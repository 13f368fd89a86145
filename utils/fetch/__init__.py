"""Downloading: HTTP sessions with retries and the address policy, verified image
downloads (``download``), the published assets (``assets``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "assets": "AssetError DEFAULT_MANIFEST HASHES_FILE HashRecords NetworkError ROOT check_present "
        "fetch_asset load_manifest select_assets",
        "download": "ALLOW_OPTION AddressPolicy DEFAULT_MAX_BYTES FetchResult clean_stale_temps download_one "
        "make_session parse_url_map unchanged_since url_host",
    },
)
