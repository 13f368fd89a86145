"""File formats: the published CSVs, recall results and vectors, POI tables (read safely), images."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "images": "ImageDataset SIZE ZERO_TENSOR decode_rgb load_clip_image load_image load_image_into to_tensor",
        "poi": "ItemInputs KINDS MAX_POIS PoiTableError PoiTables SAFE_SUFFIX describe_table load_poi_table "
        "load_poi_tables poi_vector_tables pois_text save_tables stack_inputs table_output",
        "results": "TOPK_HEADER load_embeddings read_results save_embeddings write_full write_missing_list write_topk",
        "rows": "IMAGE_EXTS RankRow RecallRow csv_records index_images iter_rank_csv iter_recall_csv poi_of_image "
        "read_recall_rows sniff_format",
    },
)
