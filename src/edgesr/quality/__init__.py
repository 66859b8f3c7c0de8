"""Quality evaluation: the standard SR protocol (Y-PSNR/SSIM) on any model form."""
