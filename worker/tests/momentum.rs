//! The momentum mechanism of ALBEF and BLIP against formulas written out here: the momentum
//! update, the feature queue, the distilled contrastive loss (a plain loop with log-sum-exp, and
//! its analytic gradient), data-parallel exactness of the loss shares, and the state digest.

use braid::objectives::distill::{alpha_at, local_loss, MomentumKeys};
use braid::objectives::momentum::{state_digest, MomentumCopy};
use braid::objectives::queue::{check_queue_size, global_batch_rows, FeatureQueue};
use braid::trainer::seeded;
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

fn rows_of(t: &Tensor) -> Vec<Vec<f64>> {
    let d = t.size()[1] as usize;
    values(t).chunks(d).map(|c| c.to_vec()).collect()
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

fn named_params(seed: u64) -> Vec<(String, Tensor)> {
    seeded(seed, || {
        vec![
            ("visual.conv1.weight".to_string(), Tensor::randn([4, 3, 2, 2], F64)),
            ("visual.proj".to_string(), Tensor::randn([5, 3], F64)),
            ("text.ln.bias".to_string(), Tensor::randn([7], F64)),
        ]
    })
}

// ---------------------------------------------------------------- momentum update

#[test]
fn momentum_update_follows_the_formula_for_three_steps() {
    let live = named_params(1);
    for (_, t) in &live {
        let _ = t.set_requires_grad(true);
    }
    let mut momentum = MomentumCopy::new(&live);
    let mut reference: Vec<Vec<f64>> = live.iter().map(|(_, t)| values(t)).collect();
    for (step, m) in [0.995, 0.9, 0.5].into_iter().enumerate() {
        // The optimizer moves the live weights; then the momentum copy follows them.
        let moved = named_params(10 + step as u64);
        for ((_, t), (_, new)) in live.iter().zip(&moved) {
            tch::no_grad(|| t.shallow_clone().copy_(new));
        }
        momentum.update(&live, m).unwrap();
        for (r, (_, t)) in reference.iter_mut().zip(&live) {
            for (x, theta) in r.iter_mut().zip(values(t)) {
                *x = m * *x + (1.0 - m) * theta;
            }
        }
        for ((name, t), r) in momentum.named("momentum.").iter().zip(&reference) {
            assert!(name.starts_with("momentum."), "{name}");
            assert_eq!(t.kind(), Kind::Double);
            assert!(!t.requires_grad(), "{name} is in the autograd graph");
            for (i, (a, b)) in values(t).iter().zip(r).enumerate() {
                assert!((a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1.0), "step {step} {name}[{i}]: {a} vs {b}");
            }
        }
    }
}

#[test]
fn momentum_is_kept_in_fp32_for_low_precision_weights() {
    let live: Vec<(String, Tensor)> =
        named_params(2).into_iter().map(|(n, t)| (n, t.to_kind(Kind::BFloat16))).collect();
    let mut momentum = MomentumCopy::new(&live);
    assert!(momentum.tensors().iter().all(|t| t.kind() == Kind::Float));
    let target: Vec<(String, Tensor)> = live.iter().map(|(n, t)| (n.clone(), t.ones_like())).collect();
    momentum.update(&target, 0.75).unwrap();
    for ((_, m), (_, l)) in momentum.named("").iter().zip(&live) {
        let expected = l.to_kind(Kind::Float) * 0.75 + 0.25;
        let diff = (m - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }
}

#[test]
fn momentum_over_existing_storage_writes_into_it() {
    let live = named_params(3);
    let tower: Vec<(String, Tensor)> = live.iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect();
    let mut momentum = MomentumCopy::over(tower.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &live).unwrap();
    for ((_, a), (_, b)) in tower.iter().zip(&live) {
        assert_eq!(values(a), values(b), "the tower starts as the live weights");
    }
    let zeros: Vec<(String, Tensor)> = live.iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect();
    momentum.update(&zeros, 0.5).unwrap();
    for ((_, a), (_, b)) in tower.iter().zip(&live) {
        let half: Vec<f64> = values(b).iter().map(|x| 0.5 * x).collect();
        assert_eq!(values(a), half, "the tower sees the update");
    }
}

#[test]
fn momentum_refuses_other_parameters_and_round_trips_a_checkpoint() {
    let live = named_params(4);
    let mut momentum = MomentumCopy::new(&live);
    let mut renamed = named_params(4);
    renamed[1].0 = "visual.other".into();
    let err = momentum.update(&renamed, 0.9).unwrap_err().to_string();
    assert!(err.contains("visual.other") && err.contains("visual.proj"), "{err}");
    let err = momentum.update(&live[..2], 0.9).unwrap_err().to_string();
    assert!(err.contains("2 tensors") && err.contains("has 3"), "{err}");

    let saved: Vec<(String, Tensor)> = momentum.named("momentum.").into_iter().map(|(n, t)| (n, t.copy())).collect();
    let digest = momentum.digest();
    momentum.update(&named_params(5), 0.5).unwrap();
    assert_ne!(momentum.digest(), digest);
    let map: std::collections::HashMap<String, Tensor> = saved.into_iter().collect();
    momentum.load(|k| map.get(k), "momentum.", "step-000010").unwrap();
    assert_eq!(momentum.digest(), digest);
    let err = momentum.load(|_| None, "momentum.", "step-000010").unwrap_err().to_string();
    assert!(err.contains("step-000010") && err.contains("momentum.visual.conv1.weight"), "{err}");
}

#[test]
fn momentum_update_on_cuda_equals_cpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let cuda = Device::Cuda(0);
    for kind in [Kind::Float, Kind::Double] {
        let live: Vec<(String, Tensor)> = named_params(6).into_iter().map(|(n, t)| (n, t.to_kind(kind))).collect();
        let live_gpu: Vec<(String, Tensor)> = live.iter().map(|(n, t)| (n.clone(), t.to_device(cuda))).collect();
        let mut cpu = MomentumCopy::new(&live);
        let mut gpu = MomentumCopy::new(&live_gpu);
        let next = named_params(7);
        let next_cpu: Vec<(String, Tensor)> = next.iter().map(|(n, t)| (n.clone(), t.to_kind(kind))).collect();
        let next_gpu: Vec<(String, Tensor)> = next_cpu.iter().map(|(n, t)| (n.clone(), t.to_device(cuda))).collect();
        cpu.update(&next_cpu, 0.995).unwrap();
        gpu.update(&next_gpu, 0.995).unwrap();
        for ((name, a), (_, b)) in cpu.named("").iter().zip(&gpu.named("")) {
            assert_eq!(b.device(), cuda);
            let diff = (a - b.to_device(Device::Cpu)).abs().max().double_value(&[]);
            let tol = if kind == Kind::Double { 1e-15 } else { 1e-6 };
            assert!(diff <= tol, "{kind:?} {name}: {diff}");
        }
    }
}

// ---------------------------------------------------------------- queue

#[test]
fn queue_starts_with_unit_features_equal_on_every_rank() {
    let a = FeatureQueue::new(16, 8, 42, Kind::Double, Device::Cpu);
    let b = FeatureQueue::new(16, 8, 42, Kind::Double, Device::Cpu);
    let c = FeatureQueue::new(16, 8, 43, Kind::Double, Device::Cpu);
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), c.digest());
    for row in rows_of(&a.features) {
        let norm: f64 = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-14, "{norm}");
    }
    let f32_queue = FeatureQueue::new(16, 8, 42, Kind::Float, Device::Cpu);
    assert_eq!(values(&f32_queue.features), values(&a.features.to_kind(Kind::Float)), "the draw does not depend on the kind");
    assert_eq!(a.pointer, 0);
}

#[test]
fn queue_enqueue_wraps_and_keeps_the_newest_features() {
    let (k, d, g) = (12, 3, 4);
    let mut queue = FeatureQueue::new(k, d, 1, Kind::Double, Device::Cpu);
    let batches: Vec<Tensor> = (0..5).map(|s| Tensor::full([g, d], s as f64 + 1.0, F64) + Tensor::arange(g, F64).unsqueeze(1) * 0.1).collect();
    let mut pointers = Vec::new();
    for b in &batches {
        queue.enqueue(b).unwrap();
        pointers.push(queue.pointer);
    }
    assert_eq!(pointers, [4, 8, 0, 4, 8]);
    // After 5 batches into 3 slots of 4: slots 0..4 hold batch 3, 4..8 batch 4, 8..12 batch 2.
    let expected: Vec<f64> = [3, 4, 2].iter().flat_map(|&s| values(&batches[s])).collect();
    assert_eq!(values(&queue.features), expected);
    // The newest K features, oldest first, start at the pointer.
    let order: Vec<i64> = (0..k).map(|i| (queue.pointer + i) % k).collect();
    let newest = queue.features.index_select(0, &Tensor::from_slice(&order));
    let expected: Vec<f64> = [2, 3, 4].iter().flat_map(|&s| values(&batches[s])).collect();
    assert_eq!(values(&newest), expected);
}

#[test]
fn queue_size_must_be_a_multiple_of_the_global_batch() {
    assert!(check_queue_size(65_536, 512).is_ok());
    assert!(check_queue_size(57_600, 2_880).is_ok());
    let err = check_queue_size(10, 4).unwrap_err();
    assert!(err.contains("queue size 10") && err.contains("global batch 4"), "{err}");
    assert!(err.contains("8 or 12"), "{err}");
    let err = check_queue_size(57_600, 512).unwrap_err();
    assert!(err.contains("57600") && err.contains("512"), "{err}");
    assert!(check_queue_size(0, 4).is_err());
    assert!(check_queue_size(8, 0).is_err());

    let mut queue = FeatureQueue::new(10, 3, 1, Kind::Double, Device::Cpu);
    let err = queue.enqueue(&Tensor::zeros([4, 3], F64)).unwrap_err().to_string();
    assert!(err.contains("queue size 10") && err.contains("global batch 4"), "{err}");
    let err = queue.enqueue(&Tensor::zeros([5, 4], F64)).unwrap_err().to_string();
    assert!(err.contains("[5, 4]"), "{err}");
}

#[test]
fn queue_round_trips_a_checkpoint_with_its_pointer() {
    let mut queue = FeatureQueue::new(8, 3, 5, Kind::Double, Device::Cpu);
    queue.enqueue_valid(&Tensor::ones([4, 3], F64), &Tensor::from_slice(&[true, false, true, true])).unwrap();
    let saved: std::collections::HashMap<String, Tensor> =
        queue.named("queue.text.").into_iter().map(|(n, t)| (n, t.copy())).collect();
    assert_eq!(saved.len(), 3);
    let digest = queue.digest();
    let mut restored = FeatureQueue::new(8, 3, 6, Kind::Double, Device::Cpu);
    assert_ne!(restored.digest(), digest);
    restored.load(|k| saved.get(k), "queue.text.", "ckpt").unwrap();
    assert_eq!(restored.pointer, 4);
    assert_eq!(restored.digest(), digest);
    let bad_pointer: std::collections::HashMap<String, Tensor> =
        saved.iter().map(|(n, t)| (n.clone(), if n.ends_with("pointer") { Tensor::from(9i64) } else { t.shallow_clone() })).collect();
    let err = restored.load(|k| bad_pointer.get(k), "queue.text.", "ckpt").unwrap_err().to_string();
    assert!(err.contains("queue.text.pointer") && err.contains('9'), "{err}");
}

#[test]
fn global_batch_rows_skip_the_padding_of_each_rank() {
    // 10 samples on 3 ranks: slices of 4, 3, 3 in slots of 4.
    assert_eq!(global_batch_rows(10, 3), [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]);
    assert_eq!(global_batch_rows(8, 2), (0..8).collect::<Vec<i64>>());
    assert_eq!(global_batch_rows(5, 1), (0..5).collect::<Vec<i64>>());
}

// ---------------------------------------------------------------- distillation loss

/// One step's inputs: online and momentum features of the global batch, queues, validity.
struct Case {
    image: Tensor,
    text: Tensor,
    image_m: Tensor,
    text_m: Tensor,
    valid: Tensor,
    image_queue: FeatureQueue,
    text_queue: FeatureQueue,
}

fn case(n: i64, d: i64, k: i64, seed: u64) -> Case {
    let (image, text, image_m, text_m, iq, tq) = seeded(seed, || {
        let image = normalize(&Tensor::randn([n, d], F64));
        let text = normalize(&Tensor::randn([n, d], F64));
        let image_m = normalize(&(&image + Tensor::randn([n, d], F64) * 0.2));
        let text_m = normalize(&(&text + Tensor::randn([n, d], F64) * 0.2));
        let iq = normalize(&Tensor::randn([k, d], F64));
        let tq = normalize(&Tensor::randn([k, d], F64));
        (image, text, image_m, text_m, iq, tq)
    });
    let mut image_queue = FeatureQueue::new(k, d, seed, Kind::Double, Device::Cpu);
    let mut text_queue = FeatureQueue::new(k, d, seed + 1, Kind::Double, Device::Cpu);
    image_queue.enqueue(&iq).unwrap();
    text_queue.enqueue(&tq).unwrap();
    Case { image, text, image_m, text_m, valid: Tensor::ones([n], (Kind::Bool, Device::Cpu)), image_queue, text_queue }
}

impl Case {
    fn keys(&self) -> MomentumKeys<'_> {
        MomentumKeys {
            image_all: &self.image_m,
            text_all: &self.text_m,
            valid_all: &self.valid,
            image_queue: &self.image_queue,
            text_queue: &self.text_queue,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// The ALBEF formula for one direction, written out: returns the summed row losses, the gradient
/// of that sum with respect to each query row, and with respect to tau.
fn direction_reference(queries: &[Vec<f64>], queries_m: &[Vec<f64>], columns: &[Vec<f64>], tau: f64, alpha: f64) -> (f64, Vec<Vec<f64>>, f64) {
    let mut loss = 0.0;
    let mut grads = Vec::new();
    let mut grad_tau = 0.0;
    for (i, (q, q_m)) in queries.iter().zip(queries_m).enumerate() {
        let sim: Vec<f64> = columns.iter().map(|c| dot(q, c) / tau).collect();
        let sim_m: Vec<f64> = columns.iter().map(|c| dot(q_m, c) / tau).collect();
        let (lse, lse_m) = (log_sum_exp(&sim), log_sum_exp(&sim_m));
        let targets: Vec<f64> = (0..columns.len())
            .map(|j| alpha * (sim_m[j] - lse_m).exp() + if j == i { 1.0 - alpha } else { 0.0 })
            .collect();
        loss -= (0..columns.len()).map(|j| (sim[j] - lse) * targets[j]).sum::<f64>();
        // d(row loss)/d sim_j = p_j - y_j (the targets sum to 1).
        let dsim: Vec<f64> = (0..columns.len()).map(|j| (sim[j] - lse).exp() - targets[j]).collect();
        let mut g = vec![0.0; q.len()];
        for (j, c) in columns.iter().enumerate() {
            for (gk, ck) in g.iter_mut().zip(c) {
                *gk += dsim[j] * ck / tau;
            }
            grad_tau -= dsim[j] * sim[j] / tau;
        }
        grads.push(g);
    }
    (loss, grads, grad_tau)
}

/// Loss, gradients to image and text features, and to tau, of the whole batch by the formula.
fn reference(c: &Case, tau: f64, alpha: f64) -> (f64, Vec<Vec<f64>>, Vec<Vec<f64>>, f64) {
    let keep: Vec<usize> = values(&c.valid.to_kind(Kind::Double)).iter().enumerate().filter(|(_, v)| **v > 0.5).map(|(i, _)| i).collect();
    let pick = |t: &Tensor| -> Vec<Vec<f64>> {
        let all = rows_of(t);
        keep.iter().map(|&i| all[i].clone()).collect()
    };
    let queue = |q: &FeatureQueue| -> Vec<Vec<f64>> {
        let valid = values(&q.valid.to_kind(Kind::Double));
        rows_of(&q.features).into_iter().zip(valid).filter(|(_, v)| *v > 0.5).map(|(r, _)| r).collect()
    };
    let (image, text, image_m, text_m) = (pick(&c.image), pick(&c.text), pick(&c.image_m), pick(&c.text_m));
    let text_columns: Vec<Vec<f64>> = text_m.iter().cloned().chain(queue(&c.text_queue)).collect();
    let image_columns: Vec<Vec<f64>> = image_m.iter().cloned().chain(queue(&c.image_queue)).collect();
    let (l_i2t, g_image, t_i2t) = direction_reference(&image, &image_m, &text_columns, tau, alpha);
    let (l_t2i, g_text, t_t2i) = direction_reference(&text, &text_m, &image_columns, tau, alpha);
    let scale = 1.0 / (2.0 * keep.len() as f64);
    let mut full_image = vec![vec![0.0; image[0].len()]; c.image.size()[0] as usize];
    let mut full_text = full_image.clone();
    for (r, &i) in keep.iter().enumerate() {
        full_image[i] = g_image[r].iter().map(|g| g * scale).collect();
        full_text[i] = g_text[r].iter().map(|g| g * scale).collect();
    }
    ((l_i2t + l_t2i) * scale, full_image, full_text, (t_i2t + t_t2i) * scale)
}

/// Sum of the shares of `splits` (each share backward on its own): loss and gradients of the
/// gathered online features and tau.
fn shares(c: &Case, tau: f64, alpha: f64, splits: &[std::ops::Range<i64>]) -> (f64, Tensor, Tensor, f64) {
    let image = c.image.detach().set_requires_grad(true);
    let text = c.text.detach().set_requires_grad(true);
    let temp = Tensor::from(tau).set_requires_grad(true);
    let mut total = 0.0;
    for rows in splits {
        let len = rows.end - rows.start;
        let loss = local_loss(&image.narrow(0, rows.start, len), &text.narrow(0, rows.start, len), rows.clone(), &c.keys(), &temp, alpha);
        total += loss.double_value(&[]);
        loss.backward();
    }
    (total, image.grad(), text.grad(), temp.grad().double_value(&[]))
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= rel * scale, "{what}[{i}]: {a} vs {b} (scale {scale:e})");
    }
}

fn check_against_formula(c: &Case, tau: f64, alpha: f64) {
    let n = c.image.size()[0];
    let (loss, g_image, g_text, g_tau) = shares(c, tau, alpha, std::slice::from_ref(&(0..n)));
    let (ref_loss, ref_image, ref_text, ref_tau) = reference(c, tau, alpha);
    assert!((loss - ref_loss).abs() <= 1e-12 * ref_loss.abs(), "alpha {alpha}: loss {loss} vs {ref_loss}");
    assert_close("image grad", &values(&g_image), &ref_image.concat(), 1e-12);
    assert_close("text grad", &values(&g_text), &ref_text.concat(), 1e-12);
    assert_close("tau grad", &[g_tau], &[ref_tau], 1e-12);
}

#[test]
fn infonce_with_queue_negatives_equals_the_formula() {
    check_against_formula(&case(6, 5, 8, 21), 0.07, 0.0);
}

#[test]
fn distilled_loss_equals_the_formula() {
    check_against_formula(&case(6, 5, 8, 22), 0.07, 0.4);
    check_against_formula(&case(5, 4, 10, 23), 0.3, 0.4);
}

#[test]
fn samples_that_failed_to_load_are_left_out_of_rows_columns_and_queue() {
    let mut c = case(6, 5, 12, 24);
    c.valid = Tensor::from_slice(&[true, true, false, true, true, true]);
    let d = 5;
    let fresh = seeded(25, || normalize(&Tensor::randn([6, d], F64)));
    c.text_queue.enqueue_valid(&fresh, &Tensor::from_slice(&[true, false, true, true, false, true])).unwrap();
    check_against_formula(&c, 0.1, 0.4);
    check_against_formula(&c, 0.1, 0.0);
}

#[test]
fn shares_of_two_and_three_ranks_sum_to_the_full_batch() {
    for alpha in [0.0, 0.4] {
        let c = case(7, 5, 14, 26);
        let (loss, g_image, g_text, g_tau) = shares(&c, 0.07, alpha, std::slice::from_ref(&(0..7)));
        for splits in [vec![0..4, 4..7], vec![0..3, 3..5, 5..7]] {
            let (l, gi, gt, gtau) = shares(&c, 0.07, alpha, &splits);
            assert!((l - loss).abs() <= 1e-12 * loss.abs(), "{splits:?}: {l} vs {loss}");
            assert_close("image grad", &values(&gi), &values(&g_image), 1e-12);
            assert_close("text grad", &values(&gt), &values(&g_text), 1e-12);
            assert_close("tau grad", &[gtau], &[g_tau], 1e-12);
        }
    }
}

#[test]
fn alpha_ramps_linearly_then_stays() {
    assert_eq!(alpha_at(0, 100, 0.4), 0.0);
    assert!((alpha_at(25, 100, 0.4) - 0.1).abs() < 1e-15);
    assert_eq!(alpha_at(100, 100, 0.4), 0.4);
    assert_eq!(alpha_at(5000, 100, 0.4), 0.4);
    assert_eq!(alpha_at(0, 0, 0.4), 0.4);
}

// ---------------------------------------------------------------- digest

#[test]
fn digest_sees_every_element_and_nothing_else() {
    let named = |seed| -> Vec<(String, Tensor)> {
        let mut v = named_params(seed);
        v.push(("visual.scale".into(), Tensor::from_slice(&[1.5f32, -2.0])));
        v.push(("queue.image.pointer".into(), Tensor::from(4i64)));
        v
    };
    let base = state_digest(&named(8));
    assert_eq!(state_digest(&named(8)), base, "equal tensors, equal digests");
    let mut reversed = named(8);
    reversed.reverse();
    assert_eq!(state_digest(&reversed), base, "the digest goes by name, not list order");
    let strided: Vec<(String, Tensor)> = named(8).into_iter().map(|(n, t)| (n, if t.dim() == 2 { t.t_copy().transpose(0, 1) } else { t })).collect();
    assert_eq!(state_digest(&strided), base, "the memory layout does not matter");
    for i in 0..5 {
        let changed = named(8);
        let t = &changed[i].1;
        let flat = t.view([-1]);
        let last = flat.size()[0] - 1;
        let _ = tch::no_grad(|| flat.get(last).g_add_scalar_(1));
        assert_ne!(state_digest(&changed), base, "changing one element of {} changes the digest", changed[i].0);
    }
    let mut reshaped = named(8);
    reshaped[1].1 = reshaped[1].1.reshape([3, 5]);
    assert_ne!(state_digest(&reshaped), base, "a shape is part of the state");
    let mut renamed = named(8);
    renamed[2].0 = "text.ln.weight".into();
    assert_ne!(state_digest(&renamed), base, "a name is part of the state");
}

#[test]
fn queue_and_distilled_loss_on_cuda_equal_cpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let cuda = Device::Cuda(0);
    let c = case(6, 5, 12, 27);
    let mut gpu_queue = FeatureQueue::new(12, 5, 27, Kind::Double, cuda);
    assert_eq!(gpu_queue.digest(), FeatureQueue::new(12, 5, 27, Kind::Double, Device::Cpu).digest(), "same start on every device");
    let gathered = seeded(28, || normalize(&Tensor::randn([6, 5], F64)));
    gpu_queue.enqueue(&gathered.to_device(cuda)).unwrap();
    let mut cpu_queue = FeatureQueue::new(12, 5, 27, Kind::Double, Device::Cpu);
    cpu_queue.enqueue(&gathered).unwrap();
    assert_eq!(gpu_queue.digest(), cpu_queue.digest());

    let moved = |q: &FeatureQueue| FeatureQueue { features: q.features.to_device(cuda), valid: q.valid.to_device(cuda), pointer: q.pointer };
    let g = Case {
        image: c.image.to_device(cuda),
        text: c.text.to_device(cuda),
        image_m: c.image_m.to_device(cuda),
        text_m: c.text_m.to_device(cuda),
        valid: c.valid.to_device(cuda),
        image_queue: moved(&c.image_queue),
        text_queue: moved(&c.text_queue),
    };
    let temp = Tensor::from(0.07f64);
    let cpu = local_loss(&c.image, &c.text, 0..6, &c.keys(), &temp, 0.4).double_value(&[]);
    let gpu = local_loss(&g.image, &g.text, 0..6, &g.keys(), &temp.to_device(cuda), 0.4).double_value(&[]);
    assert!((cpu - gpu).abs() <= 1e-12 * cpu.abs(), "{cpu} vs {gpu}");
}
