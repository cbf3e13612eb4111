//! Data: WebDataset shards through object_store, the dataset manifest, tokenizers, decoding,
//! augmentation and bounded prefetch, and the synthetic image-caption set.
