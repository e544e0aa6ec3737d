"""The Ray Data jobs, one module each: its model stage (a ``worker.ModelStage`` subclass) and its writer on the
driver; the sources, the preprocess stage, placement and the run are the pipeline's.

- ``tokenize``: ``vtp-ray tokenize``, images -> resumable parquet latents (``store``) or LightningDiT shards.
- ``lightningdit``: LightningDiT's shard layout (``ShardStore``) and ``vtp-ray export`` (parquet -> shards).
- ``evaluate``: ``vtp-ray eval``, reconstruction quality (PSNR, SSIM, LPIPS, rFID).
- ``zeroshot``: ``vtp-ray eval --task zero-shot``, CLIP zero-shot accuracy.
- ``decode``: ``vtp-ray decode``, latents -> PNGs or one ADM ``.npz``.
"""
