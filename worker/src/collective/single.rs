//! The collective of a group of one: every operation is local and issues nothing but a copy,
//! so it can run inside a captured CUDA graph (which an NCCL call on another stream cannot).

use tch::Tensor;

use super::{Collective, CollectiveError};

/// Rank 0 of a world of one.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _tensor: &mut Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        Ok(tensor.f_reshape(&shape)?.copy())
    }

    fn broadcast(&mut self, _tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(CollectiveError::InvalidArgument { op: "broadcast", detail: format!("root {root} in a world of one") });
        }
        Ok(())
    }

    fn engine(&self) -> &'static str {
        "single"
    }
}
