//! Collectives: the `Collective` trait with a TCP ring engine (CPU) and an NCCL engine (CUDA).
//!
//! A worker picks its engine with [`Engine::for_device`], prepares what the engine's rendezvous
//! needs (a [`RingListener`] endpoint, or an [`NcclUniqueId`] on rank 0), publishes it through the
//! coordinator, and then calls [`connect_collective`] with what every rank received.
//! Gradients go through [`all_reduce_buckets`], which packs tensors into flat buckets and
//! puts them on the wire in the [`ReducePrecision`] the job asks for.
//!
//! The NCCL engine is asynchronous: a call returns once its operation is enqueued on the
//! stream, and a watchdog thread reports a collective that fails or hangs at the next call or
//! [`Collective::check`]. The ring engine finishes every call before returning.

mod nccl;
mod ring;
mod single;

use std::ops::Range;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use nccl::{
    nccl_available, nccl_data_type, nccl_library, NcclCollective, NcclLibraryInfo, NcclUniqueId,
    NCCL_LIBRARY_ENV,
};
pub use ring::{RingCollective, RingListener};
pub use single::SingleRank;

/// A group of ranks that reduce, gather and broadcast tensors together.
///
/// Every rank must issue the same sequence of calls with tensors of the same dtype and shape.
/// A failed call (timeout, lost peer, mismatch) leaves the collective broken: every later call
/// fails with [`CollectiveError::Broken`], and the worker re-rendezvouses.
pub trait Collective: Send {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Sum across ranks, in place. Any dtype among f32, f64, bf16, f16 (bf16 and f16
    /// accumulated in f32 and rounded once).
    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError>;
    /// Sum across ranks, in place, moved in the tensor's own dtype where the engine can: NCCL
    /// sends bf16 and f16 as they are (half the bytes of f32) and rounds its partial sums to
    /// that dtype. The default, which the ring keeps, is [`Collective::all_reduce_sum`].
    fn all_reduce_sum_in_dtype(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.all_reduce_sum(tensor)
    }
    /// Concatenation along dim 0 of every rank's tensor (same shape on every rank), in rank order.
    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Copies root's tensor into every rank's tensor, in place.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    /// Reports a failure detected after a call returned (NCCL's watchdog: a collective that
    /// timed out or failed asynchronously), as the next call would. A worker calls it after a
    /// step, before reporting the step or checkpointing its results. Engines that finish every
    /// call before returning (the ring) have nothing to report.
    fn check(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
    /// Short name for logs ("ring", "nccl").
    fn engine(&self) -> &'static str;
}

/// What went wrong in a collective call or in setting one up.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The call did not finish within the configured timeout.
    #[error("{op}: timed out after {after:?} waiting for {}", peer_name(.peer))]
    Timeout {
        /// The operation that timed out.
        op: &'static str,
        /// The rank this one was waiting on, when known (NCCL does not say).
        peer: Option<usize>,
        /// The configured timeout.
        after: Duration,
    },
    /// A peer closed its connection (process exited, killed, or it aborted the call).
    #[error("{op}: rank {peer} disconnected")]
    PeerDisconnected {
        /// The operation in flight.
        op: &'static str,
        /// The rank whose connection closed.
        peer: usize,
    },
    /// A socket error other than a timeout or a closed connection.
    #[error("{op}: i/o error with rank {peer}: {source}")]
    Io {
        /// The operation in flight.
        op: &'static str,
        /// The rank at the other end of the socket.
        peer: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The ranks disagree on the call: operation, dtype, shape, root or call sequence.
    #[error("{op}: rank {peer} disagrees: {detail}")]
    Mismatch {
        /// The operation this rank issued.
        op: &'static str,
        /// The rank that sent the disagreeing call.
        peer: usize,
        /// What differs, with both values.
        detail: String,
    },
    /// The tensor's dtype is not supported by this operation.
    #[error("{op}: unsupported dtype {kind:?} (expected one of {expected})")]
    UnsupportedDtype {
        /// The operation called.
        op: &'static str,
        /// The tensor's dtype.
        kind: Kind,
        /// The dtypes the operation takes.
        expected: &'static str,
    },
    /// An argument that can never work: bad rank, root, world size, device, or mixed dtypes.
    #[error("{op}: {detail}")]
    InvalidArgument {
        /// The operation or constructor called.
        op: &'static str,
        /// What is wrong, with the value.
        detail: String,
    },
    /// Setting up the group failed: a peer could not be reached or refused the handshake.
    #[error("rendezvous as rank {rank}: {detail}")]
    Rendezvous {
        /// This process's rank.
        rank: usize,
        /// What failed, naming the peer and its endpoint.
        detail: String,
    },
    /// An earlier call failed; the group must be rebuilt.
    #[error("{op}: the collective is broken by an earlier failure ({reason}); rebuild it")]
    Broken {
        /// The operation called.
        op: &'static str,
        /// The failure that broke it.
        reason: String,
    },
    /// NCCL or the CUDA driver reported an error, or could not be loaded.
    #[error("nccl: {0}")]
    Nccl(String),
    /// libtorch rejected a tensor operation.
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

fn peer_name(peer: &Option<usize>) -> String {
    match peer {
        Some(rank) => format!("rank {rank}"),
        None => "a peer".to_string(),
    }
}

/// Which collective engine a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// TCP ring over host memory (CPU tensors; CUDA tensors are staged through the host).
    Ring,
    /// NCCL on the GPU.
    Nccl,
}

impl Engine {
    /// NCCL for CUDA devices when the NCCL library and the CUDA driver load, the ring otherwise.
    pub fn for_device(device: Device) -> Engine {
        if device.is_cuda() && nccl_available() {
            Engine::Nccl
        } else {
            Engine::Ring
        }
    }
}

/// What every rank received from the rendezvous, per engine.
pub enum Rendezvous {
    /// The ring: this rank's listener and every rank's published endpoint, in rank order.
    Ring {
        /// The listener whose endpoint this rank published.
        listener: RingListener,
        /// Every rank's endpoint, index = rank.
        endpoints: Vec<String>,
        /// Session id shared by the ranks of this generation; peers with another are refused.
        session: u64,
    },
    /// NCCL: the unique id rank 0 created and published.
    Nccl {
        /// Rank 0's id.
        id: NcclUniqueId,
    },
}

/// Builds this rank's collective from the rendezvous material: NCCL for `Rendezvous::Nccl`
/// (the device must be CUDA), the TCP ring for `Rendezvous::Ring` (any device).
pub fn connect_collective(
    device: Device,
    rank: usize,
    world_size: usize,
    rendezvous: Rendezvous,
    timeout: Duration,
) -> Result<Box<dyn Collective>, CollectiveError> {
    match rendezvous {
        Rendezvous::Ring {
            listener,
            endpoints,
            session,
        } => Ok(Box::new(RingCollective::connect(
            listener, rank, world_size, &endpoints, session, timeout,
        )?)),
        Rendezvous::Nccl { id } => Ok(Box::new(NcclCollective::connect(
            device, rank, world_size, &id, timeout,
        )?)),
    }
}

/// Copies `tensors` (same dtype and device, any shapes) into one contiguous 1-D tensor.
pub fn flatten(tensors: &[Tensor]) -> Result<Tensor, CollectiveError> {
    let Some(first) = tensors.first() else {
        return Err(CollectiveError::InvalidArgument {
            op: "flatten",
            detail: "no tensors".to_string(),
        });
    };
    let (kind, device) = (first.f_kind()?, first.device());
    let mut flat = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let (k, d) = (t.f_kind()?, t.device());
        if k != kind || d != device {
            return Err(CollectiveError::InvalidArgument {
                op: "flatten",
                detail: format!("tensor {i} is {k:?} on {d:?}, tensor 0 is {kind:?} on {device:?}"),
            });
        }
        flat.push(t.f_reshape([-1])?);
    }
    Ok(Tensor::f_cat(&flat, 0)?)
}

/// Copies consecutive slices of the 1-D `flat` back into `tensors` (the inverse of [`flatten`]).
pub fn unflatten(flat: &Tensor, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
    let total: usize = tensors.iter().map(Tensor::numel).sum();
    if flat.dim() != 1 || flat.numel() != total {
        return Err(CollectiveError::InvalidArgument {
            op: "unflatten",
            detail: format!(
                "flat tensor has shape {:?}, the tensors hold {total} elements",
                flat.size()
            ),
        });
    }
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in tensors.iter_mut() {
            let n = t.numel() as i64;
            let part = flat.f_narrow(0, offset, n)?.f_view_(t.size())?;
            t.f_copy_(&part)?;
            offset += n;
        }
        Ok(())
    })
}

/// Splits tensors, in order, into buckets of at most `bucket_bytes`: a bucket ends where the
/// next tensor would overflow it or has another dtype or device; a tensor larger than
/// `bucket_bytes` gets a bucket of its own. Returns index ranges into `tensors`.
pub fn bucket_ranges(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Range<usize>> {
    let items: Vec<(usize, (Kind, Device))> = tensors
        .iter()
        .map(|t| {
            let kind = t.kind();
            (t.numel() * kind.elt_size_in_bytes(), (kind, t.device()))
        })
        .collect();
    split_buckets(&items, bucket_bytes)
}

/// The bucketing rule of [`bucket_ranges`] over `(bytes, key)` items; a change of key ends a bucket.
fn split_buckets<K: PartialEq>(items: &[(usize, K)], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let mut start = 0;
    let mut filled = 0usize;
    for (i, (bytes, key)) in items.iter().enumerate() {
        if i > start && (filled + bytes > bucket_bytes || *key != items[start].1) {
            buckets.push(start..i);
            start = i;
            filled = 0;
        }
        filled += bytes;
    }
    if start < items.len() {
        buckets.push(start..items.len());
    }
    buckets
}

/// The dtype gradients travel in during [`all_reduce_buckets`] (`cluster.reduce_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReducePrecision {
    /// Every bucket reduced in its own dtype with [`Collective::all_reduce_sum`].
    #[default]
    Fp32,
    /// f32 and bf16 buckets travel as bf16, half the bytes of f32: cast, reduced with
    /// [`Collective::all_reduce_sum_in_dtype`], and written back into the gradients in their
    /// own dtype. NCCL sums in bf16; the ring sums the bf16 values in f32 and rounds once (it
    /// sends f32, so it saves no bytes). f64 and f16 buckets are reduced as with `Fp32`.
    Bf16,
}

impl ReducePrecision {
    /// The precision a config names: `fp32` or `bf16`.
    pub fn parse(name: &str) -> Option<ReducePrecision> {
        match name {
            "fp32" => Some(ReducePrecision::Fp32),
            "bf16" => Some(ReducePrecision::Bf16),
            _ => None,
        }
    }

    /// The dtype a bucket of `kind` travels in, when it is cast for the wire.
    fn wire_kind(self, kind: Kind) -> Option<Kind> {
        match (self, kind) {
            (ReducePrecision::Bf16, Kind::Float | Kind::BFloat16) => Some(Kind::BFloat16),
            _ => None,
        }
    }
}

/// All-reduces (sums) `tensors` in place, bucket by bucket (see [`bucket_ranges`]): each bucket
/// of several tensors is flattened into one buffer, reduced in one call, and copied back; with
/// [`ReducePrecision::Bf16`] the buffer is bf16. First reports a failure the collective detected
/// since its last call ([`Collective::check`]).
pub fn all_reduce_buckets<C: Collective + ?Sized>(
    collective: &mut C,
    tensors: &mut [Tensor],
    bucket_bytes: usize,
    precision: ReducePrecision,
) -> Result<(), CollectiveError> {
    collective.check()?;
    if collective.world_size() == 1 {
        return Ok(());
    }
    for range in bucket_ranges(tensors, bucket_bytes) {
        let bucket = &mut tensors[range];
        let kind = bucket[0].f_kind()?;
        match (precision.wire_kind(kind), &mut *bucket) {
            (None, [single]) => collective.all_reduce_sum(single)?,
            (None, bucket) => {
                let mut flat = flatten(bucket)?;
                collective.all_reduce_sum(&mut flat)?;
                unflatten(&flat, bucket)?;
            }
            (Some(wire), [single]) if wire == kind => collective.all_reduce_sum_in_dtype(single)?,
            (Some(wire), [single]) => {
                let mut flat = single.f_to_kind(wire)?;
                collective.all_reduce_sum_in_dtype(&mut flat)?;
                tch::no_grad(|| single.f_copy_(&flat))?;
            }
            (Some(wire), bucket) => {
                let mut flat = flatten(bucket)?.f_to_kind(wire)?;
                collective.all_reduce_sum_in_dtype(&mut flat)?;
                unflatten(&flat, bucket)?;
            }
        }
    }
    Ok(())
}

/// Broadcasts `tensors` in place from rank `root`, bucket by bucket (see [`bucket_ranges`]):
/// afterwards every rank holds `root`'s values.
pub fn broadcast_buckets<C: Collective + ?Sized>(
    collective: &mut C,
    tensors: &mut [Tensor],
    bucket_bytes: usize,
    root: usize,
) -> Result<(), CollectiveError> {
    collective.check()?;
    if collective.world_size() == 1 {
        return Ok(());
    }
    for range in bucket_ranges(tensors, bucket_bytes) {
        match &mut tensors[range] {
            [single] => collective.broadcast(single, root)?,
            bucket => {
                let mut flat = flatten(bucket)?;
                collective.broadcast(&mut flat, root)?;
                unflatten(&flat, bucket)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_order_and_respect_the_limit() {
        let items: Vec<(usize, u8)> = [40, 40, 30, 10, 100, 5, 5]
            .iter()
            .map(|&b| (b, 0))
            .collect();
        assert_eq!(split_buckets(&items, 100), vec![0..2, 2..4, 4..5, 5..7]);
    }

    #[test]
    fn oversized_tensor_gets_its_own_bucket() {
        let items: Vec<(usize, u8)> = [10, 500, 10, 10].iter().map(|&b| (b, 0)).collect();
        assert_eq!(split_buckets(&items, 64), vec![0..1, 1..2, 2..4]);
        let items: Vec<(usize, u8)> = vec![(500, 0)];
        assert_eq!(split_buckets(&items, 64), vec![0..1]);
        assert!(split_buckets::<u8>(&[], 64).is_empty());
    }

    #[test]
    fn dtype_change_ends_a_bucket() {
        let items = vec![(4, 'f'), (4, 'f'), (2, 'b'), (2, 'b'), (4, 'f')];
        assert_eq!(split_buckets(&items, 1 << 20), vec![0..2, 2..4, 4..5]);
    }

    #[test]
    fn bucket_ranges_reads_sizes_and_dtypes_from_tensors() {
        let tensors = vec![
            Tensor::zeros([10], (Kind::Float, Device::Cpu)), // 40 bytes
            Tensor::zeros([5], (Kind::Float, Device::Cpu)),  // 20 bytes
            Tensor::zeros([5], (Kind::Double, Device::Cpu)), // 40 bytes, other dtype
            Tensor::zeros([30], (Kind::Double, Device::Cpu)), // 240 bytes, oversized
        ];
        assert_eq!(bucket_ranges(&tensors, 64), vec![0..2, 2..3, 3..4]);
    }

    #[test]
    fn flatten_then_unflatten_round_trips() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let b = Tensor::from_slice(&[10f32, 11.]);
        let c = Tensor::from(7f32); // 0-dim
        let d = Tensor::arange(8, (Kind::Float, Device::Cpu))
            .view([4, 2])
            .transpose(0, 1);
        let originals = [a, b, c, d];
        let flat = flatten(&originals).unwrap();
        assert_eq!(flat.size(), vec![6 + 2 + 1 + 8]);
        let expected: Vec<f32> = [
            vec![0., 1., 2., 3., 4., 5., 10., 11., 7.],
            vec![0., 2., 4., 6., 1., 3., 5., 7.],
        ]
        .concat();
        assert_eq!(Vec::<f32>::try_from(&flat).unwrap(), expected);

        let doubled = &flat * 2.0;
        let mut targets: Vec<Tensor> = originals.iter().map(|t| t.zeros_like()).collect();
        targets[3] = originals[3].copy(); // non-contiguous target keeps its layout
        unflatten(&doubled, &mut targets).unwrap();
        for (t, o) in targets.iter().zip(&originals) {
            assert_eq!(t.size(), o.size());
            assert!(t.equal(&(o * 2.0)), "{t:?} != 2 * {o:?}");
        }
    }

    #[test]
    fn flatten_refuses_mixed_dtypes_and_unflatten_wrong_sizes() {
        let a = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        let err = flatten(&[a.copy(), b]).unwrap_err();
        assert!(err.to_string().contains("tensor 1 is Double"), "{err}");
        let mut targets = vec![a];
        let err = unflatten(
            &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            &mut targets,
        )
        .unwrap_err();
        assert!(err.to_string().contains("2 elements"), "{err}");
    }

    #[test]
    fn all_reduce_buckets_on_one_rank_keeps_values() {
        let listener = RingListener::bind("127.0.0.1:0").unwrap();
        let endpoints = vec![listener.1.clone()];
        let mut ring =
            RingCollective::connect(listener.0, 0, 1, &endpoints, 1, Duration::from_secs(1))
                .unwrap();
        let mut tensors = vec![
            Tensor::from_slice(&[1f32, 2.]),
            Tensor::from_slice(&[3f32]),
            Tensor::from_slice(&[4f64, 5.]),
        ];
        for precision in [ReducePrecision::Fp32, ReducePrecision::Bf16] {
            all_reduce_buckets(&mut ring, &mut tensors, 1 << 20, precision).unwrap();
            assert_eq!(Vec::<f64>::try_from(&tensors[2]).unwrap(), vec![4., 5.]);
            assert_eq!(Vec::<f32>::try_from(&tensors[0]).unwrap(), vec![1., 2.]);
        }
    }

    #[test]
    fn reduce_precision_parses_config_names_and_picks_wire_dtypes() {
        assert_eq!(ReducePrecision::parse("fp32"), Some(ReducePrecision::Fp32));
        assert_eq!(ReducePrecision::parse("bf16"), Some(ReducePrecision::Bf16));
        assert_eq!(ReducePrecision::parse("fp16"), None);
        assert_eq!(ReducePrecision::default(), ReducePrecision::Fp32);
        let bf16 = ReducePrecision::Bf16;
        assert_eq!(bf16.wire_kind(Kind::Float), Some(Kind::BFloat16));
        assert_eq!(bf16.wire_kind(Kind::BFloat16), Some(Kind::BFloat16));
        assert_eq!(bf16.wire_kind(Kind::Double), None);
        assert_eq!(ReducePrecision::Fp32.wire_kind(Kind::Float), None);
    }
}
