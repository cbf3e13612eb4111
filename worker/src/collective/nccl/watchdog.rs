//! The watchdog's bookkeeping, free of CUDA so the CPU tests can drive it with a fake clock:
//! the collectives in flight in enqueue order ([`PendingOps`]) and the decision at each poll
//! ([`watchdog_verdict`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::super::CollectiveError;

/// State of the stream up to a collective's completion event, at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventState {
    /// The collective and everything before it on the stream finished.
    Complete,
    /// Still running (or queued behind earlier work).
    Pending,
    /// The stream reported an error.
    Failed(String),
}

/// What the watchdog decides at one poll of a collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The collective completed.
    Done,
    /// Still running, within the deadline.
    KeepWaiting,
    /// The stream or the communicator failed: abort.
    Failed(String),
    /// Past the deadline: abort.
    TimedOut,
}

/// The watchdog's decision from one poll, with the time passed in: completion wins, then an
/// error of the stream or the communicator, then the deadline.
pub fn watchdog_verdict(
    now: Instant,
    deadline: Instant,
    event: EventState,
    async_error: Option<String>,
) -> Verdict {
    match event {
        EventState::Complete => Verdict::Done,
        EventState::Failed(e) => Verdict::Failed(format!("the CUDA stream failed: {e}")),
        EventState::Pending => match async_error {
            Some(e) => Verdict::Failed(format!("asynchronous NCCL error: {e}")),
            None if now >= deadline => Verdict::TimedOut,
            None => Verdict::KeepWaiting,
        },
    }
}

/// Why the watchdog (or a failed launch) broke a communicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The collective that failed ("communicator" for an error with none in flight).
    pub op: &'static str,
    /// What happened to it.
    pub cause: Cause,
}

/// What happened to a failed collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It did not complete within the timeout.
    TimedOut(Duration),
    /// NCCL or the stream reported an error.
    Error(String),
}

impl Failure {
    /// The error a call reports for this failure.
    pub fn to_error(&self) -> CollectiveError {
        match &self.cause {
            Cause::TimedOut(after) => CollectiveError::Timeout {
                op: self.op,
                peer: None,
                after: *after,
            },
            Cause::Error(reason) => CollectiveError::Nccl(format!("{}: {reason}", self.op)),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            Cause::TimedOut(after) => write!(f, "{} timed out after {after:?}", self.op),
            Cause::Error(reason) => write!(f, "{}: {reason}", self.op),
        }
    }
}

/// Collectives enqueued on one stream and not yet seen complete, oldest first, each with its
/// completion event `E`. Work on one stream completes in order, so the watchdog judges the
/// oldest: its clock starts when it was enqueued or when its predecessor was seen complete,
/// whichever is later, so a collective queued behind a slow one is not charged for the wait.
pub struct PendingOps<E> {
    timeout: Duration,
    ops: VecDeque<PendingOp<E>>,
}

struct PendingOp<E> {
    event: E,
    op: &'static str,
    since: Instant,
}

impl<E> PendingOps<E> {
    /// An empty queue whose collectives each get `timeout`.
    pub fn new(timeout: Duration) -> PendingOps<E> {
        PendingOps {
            timeout,
            ops: VecDeque::new(),
        }
    }

    /// Adds collective `op`, enqueued at `now`, whose completion `event` marks.
    pub fn push(&mut self, event: E, op: &'static str, now: Instant) {
        self.ops.push_back(PendingOp {
            event,
            op,
            since: now,
        });
    }

    /// Number of collectives not yet seen complete.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether every collective was seen complete.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// One watchdog poll at `now`: retires the completed collectives at the front (their
    /// events go to `retired`), then judges the oldest one still running with
    /// [`watchdog_verdict`]; `query` tells an event's state. An asynchronous error with nothing
    /// in flight is a failure too. `None` while everything is healthy.
    pub fn poll(
        &mut self,
        now: Instant,
        mut query: impl FnMut(&E) -> EventState,
        async_error: Option<String>,
        retired: &mut Vec<E>,
    ) -> Option<Failure> {
        while let Some(oldest) = self.ops.front() {
            let (op, deadline) = (oldest.op, oldest.since + self.timeout);
            let cause = match watchdog_verdict(now, deadline, query(&oldest.event), async_error.clone()) {
                Verdict::Done => {
                    let done = self.ops.pop_front().expect("the oldest collective exists");
                    retired.push(done.event);
                    if let Some(next) = self.ops.front_mut() {
                        next.since = next.since.max(now);
                    }
                    continue;
                }
                Verdict::KeepWaiting => return None,
                Verdict::Failed(reason) => Cause::Error(reason),
                Verdict::TimedOut => Cause::TimedOut(self.timeout),
            };
            return Some(Failure { op, cause });
        }
        async_error.map(|e| Failure {
            op: "communicator",
            cause: Cause::Error(format!("asynchronous NCCL error: {e}")),
        })
    }

    /// Removes every collective, handing back the events.
    pub fn drain(&mut self) -> impl Iterator<Item = E> + '_ {
        self.ops.drain(..).map(|pending| pending.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_waits_then_times_out_on_a_fake_clock() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let at = |s: u64| start + Duration::from_secs(s);
        let pending = || EventState::Pending;
        assert_eq!(watchdog_verdict(at(1), deadline, pending(), None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(29), deadline, pending(), None), Verdict::KeepWaiting);
        assert_eq!(watchdog_verdict(at(30), deadline, pending(), None), Verdict::TimedOut);
        assert_eq!(watchdog_verdict(at(31), deadline, EventState::Complete, None), Verdict::Done);
    }

    #[test]
    fn watchdog_aborts_on_errors_before_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(30);
        let v = watchdog_verdict(start, deadline, EventState::Pending, Some("remote rank died".into()));
        assert_eq!(v, Verdict::Failed("asynchronous NCCL error: remote rank died".into()));
        let failed = EventState::Failed("CUDA_ERROR_LAUNCH_FAILED".into());
        let v = watchdog_verdict(start, deadline, failed, None);
        assert!(matches!(v, Verdict::Failed(m) if m.contains("LAUNCH_FAILED")));
        // Completion wins over an error seen at the same poll.
        let v = watchdog_verdict(start, deadline, EventState::Complete, Some("late".into()));
        assert_eq!(v, Verdict::Done);
    }

    /// Fake events: ids whose state the test sets.
    struct FakeStream(std::collections::HashMap<u32, EventState>);

    impl FakeStream {
        fn query(&self) -> impl FnMut(&u32) -> EventState + '_ {
            |id| self.0.get(id).cloned().unwrap_or(EventState::Pending)
        }
    }

    #[test]
    fn pending_ops_retire_in_order_and_drain_to_zero() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();
        assert_eq!(ops.poll(at(0), stream.query(), None, &mut retired), None);
        ops.push(1, "all_reduce_sum", at(0));
        ops.push(2, "all_gather", at(1));
        ops.push(3, "broadcast", at(2));
        assert_eq!(ops.len(), 3);

        // Only the first completed: it retires, the others keep waiting.
        stream.0.insert(1, EventState::Complete);
        assert_eq!(ops.poll(at(5), stream.query(), None, &mut retired), None);
        assert_eq!((ops.len(), retired.as_slice()), (2, [1].as_slice()));

        // The rest completed: the queue drains to zero, events handed back in order.
        stream.0.insert(2, EventState::Complete);
        stream.0.insert(3, EventState::Complete);
        assert_eq!(ops.poll(at(6), stream.query(), None, &mut retired), None);
        assert!(ops.is_empty());
        assert_eq!(retired, vec![1, 2, 3]);
    }

    #[test]
    fn pending_op_times_out_counting_from_when_it_reached_the_head() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();
        ops.push(1, "all_reduce_sum", at(0));
        ops.push(2, "broadcast", at(0));
        assert_eq!(ops.poll(at(9), stream.query(), None, &mut retired), None);

        // The first completes at 9 s: the second's clock starts then, not at 0 s.
        stream.0.insert(1, EventState::Complete);
        assert_eq!(ops.poll(at(9), stream.query(), None, &mut retired), None);
        assert_eq!(ops.poll(at(18), stream.query(), None, &mut retired), None);
        let failure = ops.poll(at(19), stream.query(), None, &mut retired).unwrap();
        assert_eq!(
            failure,
            Failure { op: "broadcast", cause: Cause::TimedOut(Duration::from_secs(10)) }
        );
        assert_eq!(failure.to_string(), "broadcast timed out after 10s");
        let error = failure.to_error();
        assert!(matches!(error, CollectiveError::Timeout { op: "broadcast", peer: None, .. }));
        assert_eq!(error.to_string(), "broadcast: timed out after 10s waiting for a peer");
        // The failed one stays queued so its event is released with the communicator.
        assert_eq!(ops.len(), 1);
        assert_eq!(ops.drain().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn pending_ops_fail_on_async_errors_and_stream_errors() {
        let start = Instant::now();
        let mut ops = PendingOps::new(Duration::from_secs(10));
        let mut stream = FakeStream(Default::default());
        let mut retired = Vec::new();

        // An asynchronous error names the collective in flight.
        ops.push(1, "all_gather", start);
        let error = Some("remote process exited (code 6)".to_string());
        let failure = ops.poll(start, stream.query(), error.clone(), &mut retired).unwrap();
        assert_eq!(failure.op, "all_gather");
        assert_eq!(
            failure.to_error().to_string(),
            "nccl: all_gather: asynchronous NCCL error: remote process exited (code 6)"
        );

        // With nothing in flight it still fails the communicator.
        stream.0.insert(1, EventState::Complete);
        let failure = ops.poll(start, stream.query(), error, &mut retired).unwrap();
        assert_eq!(failure.op, "communicator");
        assert!(ops.is_empty());

        // A failed stream fails the oldest collective.
        ops.push(2, "all_reduce_sum", start);
        stream.0.insert(2, EventState::Failed("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        let failure = ops.poll(start, stream.query(), None, &mut retired).unwrap();
        assert_eq!(failure.op, "all_reduce_sum");
        assert!(failure.to_string().contains("ILLEGAL_ADDRESS"), "{failure}");
    }
}
