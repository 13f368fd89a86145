"""Training mechanics shared by both trainers: DDP, schedules, exact resume, the run
lock, the metrics CSV (``loop``)."""

from utils import front_door

__all__, __getattr__ = front_door(
    __name__,
    {
        "loop": "ResumableSampler all_mean amp_autocast augment_pil barrier build_optimizer build_scheduler "
        "check_finite_loss check_global_batch check_text_file gather_with_grad loader_generator "
        "open_run optimizer_step progress restore_state run_lock save_checkpoint_and_state "
        "seed_everything setup_distributed setup_rank_logging start_run teardown_distributed "
        "wrap_ddp",
    },
)
