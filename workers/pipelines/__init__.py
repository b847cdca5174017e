"""One module per pipeline kind (txt2img, img2img, inpaint, text2video; panorama holds the fixed
MultiDiffusion pipeline), plus what they share: ``common`` (seeding, progress, sizing) and
``features`` (per-job LoRA, embedding, VAE, token merging). workers/generate.py drives them."""
