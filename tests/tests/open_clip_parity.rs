//! braid's CLIP against open_clip's: the same tiny random weights (written by open_clip in
//! Python) must give the same image and text embeddings within 1e-5 (fp32, eval mode).

use braid::models::clip::{Clip, ClipConfig};
use braid::models::layers::Activation;
use braid_tests::{python, workspace_root};
use tch::{nn, Device, Tensor};

fn parity(quick_gelu: bool) {
    let dir = tempfile::tempdir().unwrap();
    let script = workspace_root().join("tests/python/open_clip_ref.py");
    let mut args = vec![script.to_str().unwrap(), dir.path().to_str().unwrap()];
    if quick_gelu {
        args.push("--quick-gelu");
    }
    python(&args);

    let activation = if quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
    let config = ClipConfig::preset("tiny", 49408, Some(32), activation).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), config);
    let weights = dir.path().join("weights.safetensors");
    vs.load(&weights).expect("open_clip's state_dict has exactly braid's parameter names");
    vs.freeze();

    let inputs: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("inputs.safetensors")).unwrap().into_iter().collect();
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("outputs.safetensors")).unwrap().into_iter().collect();
    let (image, text) = tch::no_grad(|| {
        (model.encode_image(&inputs["images"]), model.encode_text(&inputs["tokens"], &inputs["eot_index"]))
    });
    for (name, got) in [("image_features", image), ("text_features", text)] {
        let diff = (&got - &expected[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: max abs difference {diff:e} from open_clip");
    }
}

#[test]
fn embeddings_match_open_clip() {
    parity(false);
}

#[test]
fn embeddings_match_open_clip_with_quick_gelu() {
    parity(true);
}
