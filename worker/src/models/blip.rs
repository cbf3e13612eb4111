//! BLIP (Li et al. 2022).
