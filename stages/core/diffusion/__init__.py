"""The maths of training and sampling: the rectified-flow objective and REPA loss, the methods built on it
(REG, iREPA, dispersive loss, HASTE), RAE's token latents and time shift, and the samplers."""
