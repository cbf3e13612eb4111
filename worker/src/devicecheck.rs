//! `braid check-device`: what a GPU worker relies on, checked on the machine itself: libtorch
//! sees CUDA, NCCL loads, one-rank NCCL all-reduce (f32 accumulation and bf16 on the wire),
//! all-gather, broadcast and bucketed all-reduce on CUDA tensors give the results computed on
//! the CPU, and the NCCL watchdog works: a collective returns while the GPU is still busy, the
//! watchdog retires it once it completes, and one that outlives its timeout is aborted and
//! reported by the next call.

use std::time::{Duration, Instant};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{
    all_reduce_buckets, nccl_library, Collective, CollectiveError, NcclCollective, NcclUniqueId, ReducePrecision,
};

/// One check and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// Measured values or the error.
    pub detail: String,
}

/// Runs every check on `device` (a CUDA device).
pub fn run(device: Device) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut push = |name: &str, result: Result<String, String>| {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        // Also on stderr as it happens, so a crash keeps the checks before it.
        eprintln!("[check-device] {} {name}: {detail}", if ok { "ok" } else { "FAIL" });
        checks.push(Check { name: name.into(), ok, detail });
    };
    let cuda = tch::Cuda::is_available();
    push("libtorch sees CUDA", if cuda { Ok(format!("{} device(s)", tch::Cuda::device_count())) } else { Err("Cuda::is_available() is false".into()) });
    if !cuda {
        return checks;
    }
    match nccl_library() {
        Ok(info) => push("NCCL loads", Ok(format!("{} version {:?}", info.path, info.version))),
        Err(e) => {
            push("NCCL loads", Err(e.to_string()));
            return checks;
        }
    }
    let mut coll = match NcclUniqueId::new().and_then(|id| NcclCollective::connect(device, 0, 1, &id, Duration::from_secs(60))) {
        Ok(c) => c,
        Err(e) => {
            push("NCCL one-rank communicator", Err(e.to_string()));
            return checks;
        }
    };
    push("NCCL one-rank communicator", Ok(format!("engine {}", coll.engine())));
    for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
        push(&format!("NCCL all_reduce_sum {kind:?}"), all_reduce(&mut coll, device, kind));
        push(&format!("NCCL all_gather {kind:?}"), all_gather(&mut coll, device, kind));
        push(&format!("NCCL broadcast {kind:?}"), broadcast(&mut coll, device, kind));
    }
    push("NCCL all_reduce_sum_in_dtype BFloat16 (bf16 on the wire)", all_reduce_in_dtype(&mut coll, device));
    push("NCCL bucketed all-reduce of 40 gradients", buckets(&mut coll, device));
    push("NCCL collective returns before the GPU reaches it; watchdog retires it", asynchronous(&mut coll, device));
    drop(coll);
    push("NCCL watchdog aborts a collective past its timeout", watchdog_abort(device));
    checks
}

fn sample(kind: Kind, numel: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([numel], (Kind::Float, Device::Cpu)).to_kind(kind)
}

fn same(got: &Tensor, expected: &Tensor, what: &str) -> Result<String, String> {
    let got = got.to_device(Device::Cpu);
    if got.size() != expected.size() {
        return Err(format!("{what}: shape {:?}, expected {:?}", got.size(), expected.size()));
    }
    if got.equal(expected) {
        Ok(format!("{what}: {} elements equal to the CPU result", expected.numel()))
    } else {
        let diff = (got.to_kind(Kind::Double) - expected.to_kind(Kind::Double)).abs().max().double_value(&[]);
        Err(format!("{what}: differs from the CPU result by up to {diff:e}"))
    }
}

fn all_reduce(coll: &mut NcclCollective, device: Device, kind: Kind) -> Result<String, String> {
    let cpu = sample(kind, 1_000_003, 1);
    let mut gpu = cpu.to_device(device);
    coll.all_reduce_sum(&mut gpu).map_err(|e| e.to_string())?;
    same(&gpu, &cpu, "sum over one rank")
}

fn all_gather(coll: &mut NcclCollective, device: Device, kind: Kind) -> Result<String, String> {
    let cpu = sample(kind, 4097, 2).view([17, 241]);
    let gathered = coll.all_gather(&cpu.to_device(device)).map_err(|e| e.to_string())?;
    same(&gathered, &cpu, "gather over one rank")
}

fn broadcast(coll: &mut NcclCollective, device: Device, kind: Kind) -> Result<String, String> {
    let cpu = sample(kind, 65_537, 3);
    let mut gpu = cpu.to_device(device);
    coll.broadcast(&mut gpu, 0).map_err(|e| e.to_string())?;
    same(&gpu, &cpu, "broadcast from rank 0")
}

fn all_reduce_in_dtype(coll: &mut NcclCollective, device: Device) -> Result<String, String> {
    let cpu = sample(Kind::BFloat16, 1_000_003, 5);
    let mut gpu = cpu.to_device(device);
    coll.all_reduce_sum_in_dtype(&mut gpu).map_err(|e| e.to_string())?;
    same(&gpu, &cpu, "bf16 sum over one rank")
}

fn buckets(coll: &mut NcclCollective, device: Device) -> Result<String, String> {
    let cpu: Vec<Tensor> = (0..40).map(|i| sample(Kind::Float, 1000 + 977 * i, 10 + i)).collect();
    let mut gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(device)).collect();
    all_reduce_buckets(coll, &mut gpu, 64 << 10, ReducePrecision::Fp32).map_err(|e| e.to_string())?;
    for (g, c) in gpu.iter().zip(&cpu) {
        same(g, c, "bucketed sum")?;
    }
    Ok("40 tensors in 64 KiB buckets equal to the CPU result".into())
}

/// Queues about `busy` of matrix products on the device's default stream and returns at once
/// (one product's time is measured first, after a warm-up, with synchronisations).
fn queue_gpu_work(device: Device, busy: Duration) -> Tensor {
    let a = Tensor::randn([8192, 8192], (Kind::Float, device)) / 90.0;
    let mut x = a.matmul(&a);
    x.sum(Kind::Double).double_value(&[]);
    let started = Instant::now();
    for _ in 0..4 {
        x = a.matmul(&x);
    }
    x.sum(Kind::Double).double_value(&[]);
    let each = started.elapsed() / 4;
    let count = (busy.as_secs_f64() / each.as_secs_f64().max(1e-6)).ceil().min(1000.0) as usize;
    for _ in 0..count {
        x = a.matmul(&x);
    }
    x
}

/// Polls until the communicator has no collective in flight, for at most `within`.
fn drained(coll: &NcclCollective, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    while coll.pending_ops() > 0 {
        if started.elapsed() > within {
            return Err(format!("{} collective(s) still pending {within:?} after the host read the result", coll.pending_ops()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(started.elapsed())
}

fn asynchronous(coll: &mut NcclCollective, device: Device) -> Result<String, String> {
    let cpu = sample(Kind::Float, 1 << 20, 4);
    let mut gpu = cpu.to_device(device);
    drained(coll, Duration::from_secs(1))?;
    let busy = queue_gpu_work(device, Duration::from_millis(200));
    let started = Instant::now();
    coll.all_reduce_sum(&mut gpu).map_err(|e| e.to_string())?;
    let call = started.elapsed();
    let pending = coll.pending_ops();
    if pending == 0 {
        return Err(format!("all_reduce_sum returned after {call:?} with nothing pending: it waited for the GPU"));
    }
    same(&gpu, &cpu, "sum read back")?;
    let read = started.elapsed();
    let drain = drained(coll, Duration::from_secs(1))?;
    coll.check().map_err(|e| e.to_string())?;
    drop(busy);
    Ok(format!(
        "call returned in {call:?} with {pending} pending; host read the result after {read:?}; queue drained {drain:?} later"
    ))
}

fn watchdog_abort(device: Device) -> Result<String, String> {
    let timeout = Duration::from_secs(2);
    let id = NcclUniqueId::new().map_err(|e| e.to_string())?;
    let mut coll = NcclCollective::connect(device, 0, 1, &id, timeout).map_err(|e| e.to_string())?;
    let mut t = sample(Kind::Float, 4096, 6).to_device(device);
    drained(&coll, Duration::from_secs(1))?;
    // The collective waits behind three timeouts' worth of work on the stream.
    let busy = queue_gpu_work(device, 3 * timeout);
    let started = Instant::now();
    coll.all_reduce_sum(&mut t).map_err(|e| format!("enqueueing: {e}"))?;
    let reported = loop {
        match coll.check() {
            Err(e) => break e,
            Ok(()) if started.elapsed() > 10 * timeout => {
                return Err(format!("no failure reported {:?} after a collective with a {timeout:?} timeout", started.elapsed()))
            }
            Ok(()) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let detected = started.elapsed();
    if !matches!(reported, CollectiveError::Timeout { op: "all_reduce_sum", .. }) {
        return Err(format!("expected a timeout of all_reduce_sum, got: {reported}"));
    }
    if detected < timeout {
        return Err(format!("reported {reported} after only {detected:?}"));
    }
    let after = coll.broadcast(&mut t, 0).map_err(|e| e.to_string());
    if !matches!(&after, Err(e) if e.contains("broken")) {
        return Err(format!("the call after the abort should fail as broken, got {after:?}"));
    }
    drop(coll);
    drop(busy);
    let check = Tensor::f_ones([1000], (Kind::Float, device))
        .and_then(|t| t.f_sum(Kind::Double))
        .and_then(|t| t.f_double_value(&[]))
        .map_err(|e| format!("the device fails after the abort: {e}"))?;
    if check != 1000.0 {
        return Err(format!("the device computes wrong results after the abort: {check}"));
    }
    Ok(format!(
        "\"{reported}\" after {detected:?}; next call: {}; dropped after the abort; device still computes",
        after.unwrap_err()
    ))
}
