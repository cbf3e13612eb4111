//! ALBEF (Li et al. 2021, "Align before Fuse").
