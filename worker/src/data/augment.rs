//! Image decoding and the train / eval transforms.
//!
//! Training uses a random resized crop (scale in `[min_crop_scale, 1]`, aspect ratio in
//! `[3/4, 4/3]`, as torchvision's `RandomResizedCrop`); evaluation resizes the shorter side and
//! takes the centre crop. Both end in an antialiased bilinear resample and CLIP normalisation.
//! The randomness of a sample depends only on (seed, global sample position), so every world
//! size and thread schedule sees the same pixels.

use braid_coordinator::plan::SplitMix64;
use image::RgbImage;

/// Per-channel mean of CLIP's image normalisation (RGB, on the 0..1 scale), as OpenAI wrote it.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// Per-channel standard deviation of CLIP's image normalisation (RGB, on the 0..1 scale), as
/// OpenAI wrote it.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Member extensions read as images, in order of preference.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Which transform a sample gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Random resized crop with area scale in `[min_crop_scale, 1]`, then resize.
    Train {
        /// Lower bound of the crop's share of the image area.
        min_crop_scale: f64,
    },
    /// Resize the shorter side to the output size and take the centre crop.
    Eval,
}

/// A rectangle of the source image in pixel units (may be fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// Decodes an image member (`jpg`, `jpeg`, `png`; other extensions are sniffed) to RGB.
pub fn decode(bytes: &[u8], ext: &str) -> Result<RgbImage, String> {
    let decoded = match ext {
        "jpg" | "jpeg" => image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg),
        "png" => image::load_from_memory_with_format(bytes, image::ImageFormat::Png),
        _ => image::load_from_memory(bytes),
    };
    let image = decoded.map_err(|e| format!("cannot decode .{ext} image: {e}"))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(format!(".{ext} image has no pixels"));
    }
    Ok(image.to_rgb8())
}

/// A crop as torchvision's `RandomResizedCrop` draws it: ten tries at a box of random area
/// share and log-uniform aspect ratio, then a centre crop clamped to the ratio range.
pub fn random_resized_crop(width: u32, height: u32, min_scale: f64, rng: &mut SplitMix64) -> CropBox {
    let (w, h) = (width as f64, height as f64);
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let area = w * h * (min_scale + (1.0 - min_scale) * rng.unit_f64());
        let ratio = (log_lo + (log_hi - log_lo) * rng.unit_f64()).exp();
        let cw = (area * ratio).sqrt().round();
        let ch = (area / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let y = rng.below((height - ch as u32) as u64 + 1) as f64;
            let x = rng.below((width - cw as u32) as u64 + 1) as f64;
            return CropBox { x, y, width: cw, height: ch };
        }
    }
    let ratio = w / h;
    let (cw, ch) = if ratio < 3.0 / 4.0 {
        (w, (w / (3.0 / 4.0)).round().min(h))
    } else if ratio > 4.0 / 3.0 {
        ((h * 4.0 / 3.0).round().min(w), h)
    } else {
        (w, h)
    };
    CropBox { x: ((w - cw) / 2.0).floor(), y: ((h - ch) / 2.0).floor(), width: cw, height: ch }
}

/// The centred square of side `min(width, height)`: resizing it equals resizing the shorter side
/// and cropping the centre.
pub fn center_crop(width: u32, height: u32) -> CropBox {
    let side = width.min(height) as f64;
    CropBox { x: (width as f64 - side) / 2.0, y: (height as f64 - side) / 2.0, width: side, height: side }
}

/// Source taps of one output pixel along one axis: first source index and normalised weights.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// Triangle-filter taps mapping `[start, start + len)` of a source axis of `src_len` pixels onto
/// `out` pixels; the filter widens when shrinking, so downscaling averages instead of aliasing.
fn axis_taps(src_len: usize, start: f64, len: f64, out: usize) -> Vec<Taps> {
    let scale = len / out as f64;
    let support = scale.max(1.0);
    (0..out)
        .map(|o| {
            let centre = start + (o as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0) as usize).min(src_len - 1);
            let hi = ((centre + support).ceil() as usize).clamp(lo + 1, src_len);
            let mut weights: Vec<f32> =
                (lo..hi).map(|i| (1.0 - ((i as f64 + 0.5 - centre) / support).abs()).max(0.0) as f32).collect();
            let total: f32 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            } else {
                let nearest = (centre.floor().max(0.0) as usize).clamp(lo, hi - 1);
                weights.iter_mut().enumerate().for_each(|(k, w)| *w = f32::from(lo + k == nearest));
            }
            Taps { first: lo, weights }
        })
        .collect()
}

/// Resamples `crop` of `image` to `size` x `size` (bilinear, antialiased) as channel-major
/// `[3, size, size]` values on the 0..255 scale.
pub fn resample(image: &RgbImage, crop: CropBox, size: usize) -> Vec<f32> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let columns = axis_taps(width, crop.x, crop.width, size);
    let rows = axis_taps(height, crop.y, crop.height, size);
    let row_lo = rows.iter().map(|t| t.first).min().unwrap_or(0);
    let row_hi = rows.iter().map(|t| t.first + t.weights.len()).max().unwrap_or(0);
    let pixels = image.as_raw();
    // Horizontal pass over the rows the vertical taps touch: [row][out x][channel].
    let mut horizontal = vec![0f32; (row_hi - row_lo) * size * 3];
    for y in row_lo..row_hi {
        let line = &pixels[y * width * 3..(y + 1) * width * 3];
        let out = &mut horizontal[(y - row_lo) * size * 3..(y - row_lo + 1) * size * 3];
        for (ox, taps) in columns.iter().enumerate() {
            for (k, &w) in taps.weights.iter().enumerate() {
                let p = &line[(taps.first + k) * 3..(taps.first + k) * 3 + 3];
                for c in 0..3 {
                    out[ox * 3 + c] += w * p[c] as f32;
                }
            }
        }
    }
    let mut chw = vec![0f32; 3 * size * size];
    for (oy, taps) in rows.iter().enumerate() {
        for (k, &w) in taps.weights.iter().enumerate() {
            let row = &horizontal[(taps.first + k - row_lo) * size * 3..][..size * 3];
            for ox in 0..size {
                for c in 0..3 {
                    chw[(c * size + oy) * size + ox] += w * row[ox * 3 + c];
                }
            }
        }
    }
    chw
}

/// Maps channel-major 0..255 values to CLIP-normalised ones in place.
pub fn normalize(chw: &mut [f32]) {
    let plane = chw.len() / 3;
    for (c, values) in chw.chunks_mut(plane.max(1)).enumerate().take(3) {
        for v in values {
            *v = (*v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
}

/// The crop a sample at global `position` gets under `transform`.
pub fn crop_for(transform: Transform, width: u32, height: u32, seed: u64, position: u64) -> CropBox {
    match transform {
        Transform::Train { min_crop_scale } => {
            let mut rng = SplitMix64::new(seed, position);
            random_resized_crop(width, height, min_crop_scale, &mut rng)
        }
        Transform::Eval => center_crop(width, height),
    }
}

/// The full transform of one decoded image: crop, resize to `size`, normalise; `[3, size, size]`.
pub fn apply(image: &RgbImage, transform: Transform, size: usize, seed: u64, position: u64) -> Vec<f32> {
    let crop = crop_for(transform, image.width(), image.height(), seed, position);
    let mut chw = resample(image, crop, size);
    normalize(&mut chw);
    chw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8]))
    }

    #[test]
    fn resampling_the_whole_image_to_its_own_size_is_the_identity() {
        let image = gradient(20, 20);
        let chw = resample(&image, center_crop(20, 20), 20);
        for (x, y, p) in image.enumerate_pixels() {
            for c in 0..3 {
                assert_eq!(chw[(c * 20 + y as usize) * 20 + x as usize], p[c] as f32);
            }
        }
    }

    #[test]
    fn downscaling_averages_and_constant_images_stay_constant() {
        let flat = RgbImage::from_pixel(97, 61, image::Rgb([10, 200, 255]));
        let chw = resample(&flat, CropBox { x: 3.5, y: 1.0, width: 50.0, height: 40.0 }, 13);
        for (i, v) in chw.iter().enumerate() {
            let want = [10.0, 200.0, 255.0][i / 169];
            assert!((v - want).abs() < 1e-3, "{v} vs {want}");
        }
        let stripes = RgbImage::from_fn(64, 64, |x, _| image::Rgb([if x % 2 == 0 { 0 } else { 255 }; 3]));
        let chw = resample(&stripes, center_crop(64, 64), 8);
        let mut interior = chw.iter().enumerate().filter(|(i, _)| (1..7).contains(&(i % 8)));
        assert!(interior.all(|(_, v)| (v - 127.5).abs() < 1e-3), "stripes average to grey");
    }

    #[test]
    fn random_crops_respect_scale_ratio_and_bounds_and_depend_only_on_the_position() {
        for position in 0..500 {
            let crop = crop_for(Transform::Train { min_crop_scale: 0.35 }, 120, 80, 11, position);
            let share = crop.width * crop.height / (120.0 * 80.0);
            assert!(crop.x >= 0.0 && crop.y >= 0.0 && crop.x + crop.width <= 120.0 && crop.y + crop.height <= 80.0);
            assert!((0.33..=1.0).contains(&share), "share {share}");
            assert_eq!(crop, crop_for(Transform::Train { min_crop_scale: 0.35 }, 120, 80, 11, position));
        }
        let a = crop_for(Transform::Train { min_crop_scale: 0.2 }, 100, 100, 1, 0);
        let b = crop_for(Transform::Train { min_crop_scale: 0.2 }, 100, 100, 1, 1);
        assert_ne!(a, b);
    }

    #[test]
    fn eval_is_the_centre_square_and_deterministic() {
        let image = gradient(48, 30);
        assert_eq!(center_crop(48, 30), CropBox { x: 9.0, y: 0.0, width: 30.0, height: 30.0 });
        let a = apply(&image, Transform::Eval, 16, 1, 5);
        let b = apply(&image, Transform::Eval, 16, 2, 9);
        assert_eq!(a, b);
    }

    #[test]
    fn normalisation_uses_the_clip_statistics() {
        let mut chw = vec![255.0, 0.0, 127.5];
        normalize(&mut chw);
        assert!((chw[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((chw[1] + CLIP_MEAN[1] / CLIP_STD[1]).abs() < 1e-6);
        assert!((chw[2] - (0.5 - CLIP_MEAN[2]) / CLIP_STD[2]).abs() < 1e-6);
    }

    #[test]
    fn bad_bytes_do_not_decode() {
        assert!(decode(b"not an image", "png").is_err());
        let mut png = Vec::new();
        gradient(4, 4).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(decode(&png, "png").unwrap(), gradient(4, 4));
    }
}
