//! The TCP ring collective: W ranks, each on its own thread with its own ring over 127.0.0.1,
//! checked against results computed directly; plus mismatches, stale peers, dead and silent peers.

use std::time::{Duration, Instant};

use braid::collective::{
    all_reduce_buckets, Collective, CollectiveError, ReducePrecision, RingCollective,
    RingListener,
};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Binds one listener per rank and connects all of them concurrently; ring `r` is rank `r`.
fn connect_ring(world_size: usize, session: u64, timeout: Duration) -> Vec<RingCollective> {
    let (listeners, endpoints): (Vec<_>, Vec<_>) = (0..world_size)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .unzip();
    let endpoints = &endpoints;
    std::thread::scope(|s| {
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                s.spawn(move || {
                    RingCollective::connect(listener, rank, world_size, endpoints, session, timeout)
                        .unwrap()
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Runs `f` on every rank at once, one thread per rank; results in rank order.
fn on_each<R: Send>(
    rings: &mut [RingCollective],
    f: impl Fn(&mut RingCollective) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let joins: Vec<_> = rings
            .iter_mut()
            .map(|ring| s.spawn(move || f(ring)))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Rank `rank`'s input: small integers (exact in every dtype and every summation order), or
/// non-integers when `integer` is false.
fn input(rank: usize, n: usize, kind: Kind, integer: bool) -> Tensor {
    let i = Tensor::arange(n as i64, (Kind::Double, Device::Cpu));
    let values = if integer {
        (&i * 7.0 + (rank * 3) as f64).fmod(17.0) - 8.0
    } else {
        ((&i * 0.37 + rank as f64 * 1.1).sin() * 3.0).exp()
    };
    values.to_kind(kind)
}

fn direct_sum(world_size: usize, n: usize, kind: Kind, integer: bool) -> Tensor {
    let mut sum = Tensor::zeros([n as i64], (Kind::Double, Device::Cpu));
    for rank in 0..world_size {
        sum += input(rank, n, kind, integer).to_kind(Kind::Double);
    }
    sum
}

fn assert_same(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.kind(), expected.kind(), "{what}: dtype");
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    assert!(actual.equal(expected), "{what}: values differ");
}

fn all_reduce(ring: &mut RingCollective, mut t: Tensor) -> Tensor {
    ring.all_reduce_sum(&mut t).unwrap();
    t
}

const REDUCE_CASES: [(Kind, &[usize]); 3] = [
    (Kind::Float, &[1, 7, 0, 1_000_003]),
    (Kind::Double, &[1, 7, 1003]),
    (Kind::BFloat16, &[1, 7, 1003]),
];

#[test]
fn every_operation_on_rings_of_one_to_five_ranks() {
    for world_size in 1..=5 {
        let mut rings = connect_ring(world_size, 7, TIMEOUT);
        on_each(&mut rings, |ring| {
            let rank = ring.rank();
            assert_eq!(ring.world_size(), world_size);
            assert_eq!(ring.engine(), "ring");

            // All-reduce: exact integer sums in every dtype, uneven chunks included.
            for (kind, sizes) in REDUCE_CASES {
                for &n in sizes {
                    let reduced = all_reduce(ring, input(rank, n, kind, true));
                    let expected = direct_sum(world_size, n, kind, true).to_kind(kind);
                    assert_same(
                        &reduced,
                        &expected,
                        &format!("W={world_size} {kind:?} n={n}"),
                    );
                }
            }

            // All-gather: shapes with and without dims, several dtypes, in rank order.
            for (kind, shape) in [
                (Kind::Float, vec![2i64, 3]),
                (Kind::Double, vec![7]),
                (Kind::BFloat16, vec![5, 1]),
                (Kind::Int64, vec![3]),
                (Kind::Float, vec![]),
            ] {
                let numel: i64 = shape.iter().product();
                let mine = input(rank, numel as usize, kind, true).reshape(&shape);
                let gathered = ring.all_gather(&mine).unwrap();
                let parts: Vec<Tensor> = (0..world_size)
                    .map(|r| input(r, numel as usize, kind, true).reshape([-1]))
                    .map(|t| {
                        if shape.is_empty() {
                            t
                        } else {
                            t.reshape(&shape)
                        }
                    })
                    .collect();
                let expected = Tensor::cat(&parts, 0);
                assert_same(
                    &gathered,
                    &expected,
                    &format!("gather W={world_size} {kind:?} {shape:?}"),
                );
            }

            // Broadcast from every root; large (pipelined), bf16, and a strided tensor.
            for root in 0..world_size {
                for (kind, n) in [
                    (Kind::Float, 1_000_003),
                    (Kind::Float, 1),
                    (Kind::BFloat16, 7),
                    (Kind::Double, 12),
                ] {
                    let mut t = input(rank, n, kind, false);
                    ring.broadcast(&mut t, root).unwrap();
                    assert_same(
                        &t,
                        &input(root, n, kind, false),
                        &format!("broadcast W={world_size} root={root} {kind:?} n={n}"),
                    );
                }
                let mut strided = input(rank, 12, Kind::Float, false)
                    .view([3, 4])
                    .transpose(0, 1);
                ring.broadcast(&mut strided, root).unwrap();
                let expected = input(root, 12, Kind::Float, false)
                    .view([3, 4])
                    .transpose(0, 1);
                assert_same(&strided, &expected, "strided broadcast");
            }
            assert!(ring
                .broadcast(
                    &mut Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                    world_size
                )
                .is_err());
        });
    }
}

#[test]
fn all_reduce_is_reproducible_bitwise_and_identical_on_every_rank() {
    for world_size in [3, 4] {
        let mut rings = connect_ring(world_size, 1, TIMEOUT);
        let results = on_each(&mut rings, |ring| {
            let rank = ring.rank();
            let mut out = Vec::new();
            for (kind, n) in [
                (Kind::Float, 100_003),
                (Kind::BFloat16, 1001),
                (Kind::Double, 999),
            ] {
                let first = all_reduce(ring, input(rank, n, kind, false));
                let second = all_reduce(ring, input(rank, n, kind, false));
                assert_same(&second, &first, "repeated call");
                out.push(first);
            }
            out
        });
        for (rank, result) in results.iter().enumerate() {
            for (i, t) in result.iter().enumerate() {
                assert_same(
                    t,
                    &results[0][i],
                    &format!("rank {rank} vs rank 0, case {i}"),
                );
                let n = t.numel();
                let expected = direct_sum(world_size, n, t.kind(), false);
                let tolerance = if t.kind() == Kind::BFloat16 {
                    1e-2
                } else {
                    1e-5
                };
                assert!(
                    t.to_kind(Kind::Double)
                        .allclose(&expected, tolerance, 1e-6, false),
                    "case {i} is not close to the direct sum"
                );
            }
        }
    }
}

/// Gradients of mixed kinds and shapes, as the bucketed all-reduce meets them.
const BUCKET_SHAPES: [(Kind, &[i64]); 5] = [
    (Kind::Float, &[3, 4]),
    (Kind::Float, &[5]),
    (Kind::Float, &[1000]),
    (Kind::BFloat16, &[2, 2]),
    (Kind::Double, &[]),
];

#[test]
fn bucketed_all_reduce_sums_every_tensor() {
    let world_size = 3;
    let mut rings = connect_ring(world_size, 2, TIMEOUT);
    let shapes = BUCKET_SHAPES;
    let make = |rank: usize| -> Vec<Tensor> {
        shapes
            .iter()
            .map(|(kind, shape)| {
                let numel: i64 = shape.iter().product();
                input(rank, numel as usize, *kind, true).reshape(*shape)
            })
            .collect()
    };
    let results = on_each(&mut rings, |ring| {
        let mut tensors = make(ring.rank());
        all_reduce_buckets(ring, &mut tensors, 128, ReducePrecision::Fp32).unwrap();
        tensors
    });
    for tensors in &results {
        for (i, t) in tensors.iter().enumerate() {
            let mut expected = Tensor::zeros_like(&make(0)[i]).to_kind(Kind::Double);
            for rank in 0..world_size {
                expected += make(rank)[i].to_kind(Kind::Double);
            }
            assert_same(
                t,
                &expected.to_kind(t.kind()),
                &format!("bucketed tensor {i}"),
            );
        }
    }
}

/// Rank `rank`'s f32 gradient for the bf16 wire test: non-integers of either sign with
/// magnitudes in [0.02, 10.02], so that sums of up to 3 of their bf16 roundings are exact in
/// f32 (at most 18 significant bits) and the ring's summation order cannot change them.
fn gradient(rank: usize, n: usize, seed: f64) -> Tensor {
    let i = Tensor::arange(n as i64, (Kind::Double, Device::Cpu));
    let phase = &i * 0.37 + (rank as f64 * 1.1 + seed);
    let magnitude = phase.sin().abs() * 10.0 + 0.02;
    let sign = (&i * 0.91 + rank as f64 * 2.3 + seed).cos().sign();
    (magnitude * sign).to_kind(Kind::Float)
}

#[test]
fn bf16_wire_sums_the_bf16_rounded_gradients_exactly() {
    let shapes = BUCKET_SHAPES;
    let make = |rank: usize| -> Vec<Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(k, (kind, shape))| {
                let numel = shape.iter().product::<i64>() as usize;
                match kind {
                    Kind::Float => gradient(rank, numel, k as f64),
                    _ => input(rank, numel, *kind, true),
                }
                .reshape(*shape)
            })
            .collect()
    };
    for world_size in [2, 3] {
        let mut rings = connect_ring(world_size, 11, TIMEOUT);
        // 128-byte buckets: tensors 0 and 1 share one, 2 (4000 bytes), 3 and 4 have their own.
        let reduce = |rings: &mut [RingCollective], precision| {
            on_each(rings, |ring| {
                let mut tensors = make(ring.rank());
                all_reduce_buckets(ring, &mut tensors, 128, precision).unwrap();
                tensors
            })
        };
        let wire = reduce(&mut rings, ReducePrecision::Bf16);
        let full = reduce(&mut rings, ReducePrecision::Fp32);
        for (rank, tensors) in wire.iter().enumerate() {
            assert_same(&tensors[0], &wire[0][0], &format!("W={world_size} rank {rank} agrees"));
            for (i, t) in tensors.iter().enumerate() {
                let what = format!("W={world_size} rank {rank} tensor {i}");
                let mut exact = Tensor::zeros(t.size(), (Kind::Double, Device::Cpu));
                let mut rounded = Tensor::zeros(t.size(), (Kind::Double, Device::Cpu));
                let mut magnitude = Tensor::zeros(t.size(), (Kind::Double, Device::Cpu));
                for r in 0..world_size {
                    let g = &make(r)[i];
                    exact += g.to_kind(Kind::Double);
                    magnitude += g.to_kind(Kind::Double).abs();
                    rounded += g.to_kind(Kind::BFloat16).to_kind(Kind::Double);
                }
                if t.kind() == Kind::Double {
                    // f64 buckets are not cast.
                    assert_same(t, &exact, &what);
                    continue;
                }
                // The ring sums the bf16 values in f32 and rounds the sum to bf16 once.
                let expected = rounded.to_kind(Kind::BFloat16).to_kind(t.kind());
                assert_same(t, &expected, &what);
                // Within bf16 rounding of the fp32 sum.
                let error = (t.to_kind(Kind::Double) - &exact).abs();
                let worst = (error / magnitude).max().double_value(&[]);
                assert!(worst < 1e-2, "{what}: relative error {worst}");
            }
            // The f32 gradients really went through bf16: the fp32 wire gives other values.
            let differs = (&tensors[2] - &full[rank][2]).abs().max().double_value(&[]);
            assert!(differs > 0.0, "W={world_size}: bf16 wire equals the fp32 one");
        }
    }
}

#[test]
fn cuda_tensors_go_through_the_host() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let device = Device::Cuda(0);
    let mut rings = connect_ring(2, 3, TIMEOUT);
    on_each(&mut rings, |ring| {
        let rank = ring.rank();
        let reduced = all_reduce(
            ring,
            input(rank, 1001, Kind::BFloat16, true).to_device(device),
        );
        assert_eq!(reduced.device(), device);
        let expected = direct_sum(2, 1001, Kind::BFloat16, true).to_kind(Kind::BFloat16);
        assert_same(
            &reduced.to_device(Device::Cpu),
            &expected,
            "cuda all_reduce",
        );
        let gathered = ring
            .all_gather(&input(rank, 5, Kind::Float, true).to_device(device))
            .unwrap();
        assert_eq!(gathered.device(), device);
        let mut b = input(rank, 9, Kind::Float, false).to_device(device);
        ring.broadcast(&mut b, 1).unwrap();
        assert_same(
            &b.to_device(Device::Cpu),
            &input(1, 9, Kind::Float, false),
            "cuda broadcast",
        );
    });
}

#[test]
fn mismatched_calls_fail_on_both_ranks() {
    let mut rings = connect_ring(2, 4, TIMEOUT);
    let start = Instant::now();
    let errors = on_each(&mut rings, |ring| {
        let n = 5 + ring.rank();
        ring.all_reduce_sum(&mut Tensor::ones([n as i64], (Kind::Float, Device::Cpu)))
            .unwrap_err()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "mismatch took {:?}",
        start.elapsed()
    );
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, CollectiveError::Mismatch { .. })),
        "no mismatch reported: {text:?}"
    );
    assert!(
        text.iter().any(|t| t.contains("it has 6 elements, here 5")),
        "{text:?}"
    );
    // The ring is broken from now on.
    let err = rings[0]
        .all_reduce_sum(&mut Tensor::ones([5], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(matches!(err, CollectiveError::Broken { .. }), "{err}");
}

#[test]
fn stale_session_is_refused() {
    let world_size = 2;
    let (listeners, endpoints): (Vec<_>, Vec<_>) = (0..world_size)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .unzip();
    let endpoints = &endpoints;
    let start = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let joins: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                // Rank 1 still believes in the previous generation.
                let session = 10 + rank as u64;
                s.spawn(move || {
                    RingCollective::connect(
                        listener,
                        rank,
                        world_size,
                        endpoints,
                        session,
                        Duration::from_secs(1),
                    )
                    .err()
                    .expect("a stale peer must be refused")
                    .to_string()
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    for e in &errors {
        assert!(e.contains("another session"), "{e}");
    }
}

#[test]
fn peer_that_exits_mid_call_fails_the_others_quickly() {
    let timeout = Duration::from_secs(2);
    let mut rings = connect_ring(3, 5, timeout);
    let dying = rings.pop().unwrap();
    let start = Instant::now();
    let errors = std::thread::scope(|s| {
        let joins: Vec<_> = rings
            .iter_mut()
            .map(|ring| {
                s.spawn(move || {
                    let mut t = input(ring.rank(), 1_000_003, Kind::Float, false);
                    let result = ring.all_reduce_sum(&mut t);
                    (result.unwrap_err(), start.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        drop(dying);
        joins
            .into_iter()
            .map(|j| j.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (rank, (error, elapsed)) in errors.iter().enumerate() {
        assert!(
            *elapsed < timeout + Duration::from_millis(500),
            "rank {rank} took {elapsed:?}"
        );
        eprintln!("rank {rank} failed after {elapsed:?}: {error}");
        assert!(
            matches!(
                error,
                CollectiveError::PeerDisconnected { .. } | CollectiveError::Timeout { .. }
            ),
            "rank {rank}: {error}"
        );
    }
    // Rank 0 reads from rank 2, which is gone.
    assert!(
        matches!(
            errors[0].0,
            CollectiveError::PeerDisconnected { peer: 2, .. }
        ),
        "{}",
        errors[0].0
    );
}

#[test]
fn silent_peer_times_out_within_the_deadline() {
    let timeout = Duration::from_secs(2);
    let mut rings = connect_ring(3, 6, timeout);
    let _silent = rings.pop().unwrap();
    let start = Instant::now();
    let errors = on_each(&mut rings, |ring| {
        let mut t = input(ring.rank(), 1_000_003, Kind::Float, false);
        (ring.all_reduce_sum(&mut t).unwrap_err(), start.elapsed())
    });
    for (rank, (error, elapsed)) in errors.iter().enumerate() {
        assert!(
            *elapsed < timeout + Duration::from_millis(500),
            "rank {rank} took {elapsed:?}"
        );
        eprintln!("rank {rank} failed after {elapsed:?}: {error}");
    }
    assert!(
        matches!(errors[0].0, CollectiveError::Timeout { peer: Some(2), .. }),
        "{}",
        errors[0].0
    );
    assert!(
        errors[0].0.to_string().contains("all_reduce_sum"),
        "{}",
        errors[0].0
    );
    let again = rings[1]
        .all_gather(&Tensor::ones([1], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(matches!(again, CollectiveError::Broken { .. }), "{again}");
}

/// Throughput of a 64 MiB f32 all-reduce on four local ranks (run with --ignored --nocapture).
#[test]
#[ignore]
fn all_reduce_throughput() {
    let world_size = 4;
    let n = 16 << 20;
    let mut rings = connect_ring(world_size, 8, Duration::from_secs(60));
    let timings = on_each(&mut rings, |ring| {
        let mut t = input(ring.rank(), n, Kind::Float, true);
        ring.all_reduce_sum(&mut t).unwrap();
        let start = Instant::now();
        let calls = 5;
        for _ in 0..calls {
            ring.all_reduce_sum(&mut t).unwrap();
        }
        start.elapsed() / calls
    });
    let per_call = timings.iter().max().unwrap();
    let bytes = (n * 4) as f64;
    // Bus bandwidth as NCCL reports it: 2 (W-1)/W of the buffer crosses each link.
    let bus = bytes * 2.0 * (world_size - 1) as f64 / world_size as f64 / per_call.as_secs_f64();
    eprintln!(
        "all_reduce of {} MiB on {world_size} ranks: {per_call:?} per call, bus {:.2} GB/s",
        (n * 4) >> 20,
        bus / 1e9
    );
}
