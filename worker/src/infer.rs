//! `braid infer`: captions, image-text matching and contrastive scores from a trained model.
