//! `braid check-device`: what a GPU worker relies on, checked on the machine itself: libtorch
//! sees CUDA, NCCL loads, and one-rank NCCL all-reduce, all-gather, broadcast and bucketed
//! all-reduce on CUDA tensors give the results computed on the CPU.

use std::time::Duration;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{all_reduce_buckets, nccl_library, Collective, NcclCollective, NcclUniqueId};

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
    push("NCCL bucketed all-reduce of 40 gradients", buckets(&mut coll, device));
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

fn buckets(coll: &mut NcclCollective, device: Device) -> Result<String, String> {
    let cpu: Vec<Tensor> = (0..40).map(|i| sample(Kind::Float, 1000 + 977 * i, 10 + i)).collect();
    let mut gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(device)).collect();
    all_reduce_buckets(coll, &mut gpu, 64 << 10).map_err(|e| e.to_string())?;
    for (g, c) in gpu.iter().zip(&cpu) {
        same(g, c, "bucketed sum")?;
    }
    Ok("40 tensors in 64 KiB buckets equal to the CPU result".into())
}
