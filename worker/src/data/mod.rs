//! Data: WebDataset shards through object_store, the dataset manifest, tokenizers, decoding,
//! augmentation and bounded prefetch, and the synthetic image-caption set.

pub mod tokenizer;

pub mod augment;
pub mod error;
pub mod index;
pub mod loader;
pub mod mlm;
pub mod store;
pub mod synth;

pub use error::{Error, Result};
