"""Generated tiles for the minority class: a class-conditional StyleGAN2 with ADA, and its quality (KID).

May import: core, model, training.
"""
