//! The TCP ring: every rank holds one connection to the next rank and one from the previous.
//!
//! All-reduce is a ring reduce-scatter followed by a ring all-gather over `world_size` chunks
//! (uneven when the element count does not divide); each chunk is summed in the same rank order
//! on every call, so identical inputs give bitwise identical results, on every rank. All-gather
//! is the ring all-gather; broadcast is pipelined in blocks along the ring from the root.
//!
//! Every call runs under one deadline (`timeout` from its start): socket reads and writes wait at
//! most the time left. The first failure (timeout, closed peer, mismatch) shuts both sockets
//! down, which fails the neighbours' calls at once rather than at their deadlines, and leaves
//! the ring broken.
//!
//! Tensors are staged through host memory: a contiguous CPU tensor of the working dtype is read
//! and written in place; any other tensor (CUDA, strided, bf16) is copied to a host buffer and
//! back. bf16 and f16 are reduced in f32 and rounded once at the end. On the wire, elements are
//! in little-endian byte order.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};

const _: () = assert!(
    cfg!(target_endian = "little"),
    "the ring sends host-order elements as little-endian"
);

const HELLO_MAGIC: [u8; 8] = *b"BRAIDRNG";
const PROTOCOL_VERSION: u32 = 1;
const HELLO_LEN: usize = 28;
const CALL_MAGIC: u32 = u32::from_le_bytes(*b"BRC1");
const HEADER_LEN: usize = 40;
/// How long an accepted connection may take to send its hello.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Largest single `write`; the kernel takes what fits and the loop continues.
const SEND_BLOCK_BYTES: usize = 8 << 20;
/// Received data is reduced in blocks of this size, overlapping the sum with the transfer.
const RECV_BLOCK_BYTES: usize = 1 << 20;
/// Broadcast forwards blocks of this size while the next ones arrive.
const PIPELINE_BLOCK_BYTES: usize = 1 << 20;

/// Handshake answers from the accepting rank.
const ACCEPTED: u8 = 0;
const REFUSED_MAGIC: u8 = 1;
const REFUSED_SESSION: u8 = 2;
const REFUSED_WORLD_SIZE: u8 = 3;
const REFUSED_RANK: u8 = 4;

/// A bound, listening socket whose endpoint is published before the peers are known.
pub struct RingListener {
    listener: TcpListener,
    endpoint: String,
}

impl RingListener {
    /// Listens on `addr` ("127.0.0.1:0", "10.0.0.5:0", or a host name or IP, which gets port 0)
    /// and returns the listener with the endpoint ("ip:port") that peers dial. Bind to the
    /// address the other ranks can reach: an unspecified address (0.0.0.0) gives an endpoint
    /// only local peers can use.
    pub fn bind(addr: &str) -> Result<(RingListener, String), CollectiveError> {
        let addr = if addr.parse::<SocketAddr>().is_ok() || addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:0")
        };
        let bind_error = |e: std::io::Error| CollectiveError::InvalidArgument {
            op: "ring bind",
            detail: format!("cannot listen on {addr}: {e}"),
        };
        let listener = TcpListener::bind(&addr).map_err(bind_error)?;
        let endpoint = listener.local_addr().map_err(bind_error)?.to_string();
        Ok((
            RingListener {
                listener,
                endpoint: endpoint.clone(),
            },
            endpoint,
        ))
    }

    /// The endpoint peers dial ("ip:port").
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// Connections to the previous and next rank.
struct Links {
    next: TcpStream,
    prev: TcpStream,
}

/// A TCP ring collective over host memory (see the module documentation).
pub struct RingCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    links: Option<Links>,
    sequence: u64,
    broken: Option<String>,
}

impl RingCollective {
    /// Joins the ring as `rank` of `world_size`: dials `endpoints[(rank + 1) % world_size]` and
    /// accepts `(rank - 1) % world_size` on `listener`. The handshake carries the rank, the world
    /// size and `session` (the generation); a peer whose values differ is refused, and a refused
    /// or unreachable peer fails the call once `timeout` has passed. `timeout` also bounds every
    /// later collective call. `world_size == 1` makes every operation a local no-op.
    pub fn connect(
        listener: RingListener,
        rank: usize,
        world_size: usize,
        endpoints: &[String],
        session: u64,
        timeout: Duration,
    ) -> Result<RingCollective, CollectiveError> {
        let invalid = |detail: String| CollectiveError::InvalidArgument {
            op: "ring connect",
            detail,
        };
        if world_size == 0 || rank >= world_size {
            return Err(invalid(format!(
                "rank {rank} is not in a world of size {world_size}"
            )));
        }
        if endpoints.len() != world_size {
            return Err(invalid(format!(
                "{} endpoints for a world of size {world_size}",
                endpoints.len()
            )));
        }
        if timeout.is_zero() {
            return Err(invalid("timeout must be positive".to_string()));
        }
        let mut ring = RingCollective {
            rank,
            world_size,
            timeout,
            links: None,
            sequence: 0,
            broken: None,
        };
        if world_size == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + timeout;
        let hello = Hello {
            session,
            rank: rank as u32,
            world_size: world_size as u32,
        };
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        let fail = |detail: String| CollectiveError::Rendezvous { rank, detail };

        let next_endpoint = &endpoints[next_rank];
        let mut next = dial(next_endpoint, deadline).map_err(|e| {
            fail(format!(
                "cannot connect to rank {next_rank} at {next_endpoint}: {e}"
            ))
        })?;
        write_before(&mut next, &hello.encode(), deadline).map_err(|e| {
            fail(format!(
                "sending the handshake to rank {next_rank} at {next_endpoint}: {e}"
            ))
        })?;

        let expected = Hello {
            session,
            rank: prev_rank as u32,
            world_size: world_size as u32,
        };
        let prev = accept_peer(&listener.listener, &expected, deadline).map_err(|e| {
            fail(format!(
                "waiting for rank {prev_rank} on {}: {e}",
                listener.endpoint
            ))
        })?;

        let mut answer = [0u8; 1];
        read_before(&mut next, &mut answer, deadline).map_err(|e| {
            fail(format!(
                "waiting for rank {next_rank} at {next_endpoint} to accept: {e}"
            ))
        })?;
        if answer[0] != ACCEPTED {
            return Err(fail(format!(
                "rank {next_rank} at {next_endpoint} refused the handshake: {}",
                refusal_reason(answer[0])
            )));
        }
        for stream in [&next, &prev] {
            stream
                .set_nodelay(true)
                .map_err(|e| fail(format!("setting TCP_NODELAY: {e}")))?;
        }
        ring.links = Some(Links { next, prev });
        Ok(ring)
    }

    /// Runs one collective call: checks the ring is usable, exchanges the call header with the
    /// neighbours, runs `body`, and marks the ring broken on failure.
    fn run<R>(
        &mut self,
        op: Op,
        header: CallHeader,
        body: impl FnOnce(&Call<'_>) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Broken {
                op: op.name(),
                reason: reason.clone(),
            });
        }
        let links = self
            .links
            .as_ref()
            .expect("a ring of several ranks has links");
        self.sequence += 1;
        let header = CallHeader {
            sequence: self.sequence,
            ..header
        };
        let call = Call {
            op: op.name(),
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
            next: &links.next,
            prev: &links.prev,
            next_rank: (self.rank + 1) % self.world_size,
            prev_rank: (self.rank + self.world_size - 1) % self.world_size,
            failure: Mutex::new(None),
        };
        let result = call.exchange_header(&header).and_then(|()| body(&call));
        if let Err(e) = &result {
            call.shutdown();
            self.broken = Some(e.to_string());
        }
        result
    }

    fn check_root(&self, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument {
                op: Op::Broadcast.name(),
                detail: format!(
                    "root {root} is not a rank of a world of size {}",
                    self.world_size
                ),
            });
        }
        Ok(())
    }

    fn reduce_as<T: Element>(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let header = CallHeader::new(Op::AllReduceSum, tensor, 0)?;
        let (rank, world_size) = (self.rank, self.world_size);
        if let Some(data) = host_elements_mut::<T>(tensor) {
            return self.run(Op::AllReduceSum, header, |call| {
                ring_all_reduce(call, rank, world_size, data)
            });
        }
        let mut data = read_host_elements::<T>(tensor)?;
        self.run(Op::AllReduceSum, header, |call| {
            ring_all_reduce(call, rank, world_size, &mut data)
        })?;
        write_host(tensor, as_bytes(&data), T::KIND)
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let kind = tensor.f_kind()?;
        let accumulate_in = match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => Kind::Float,
            Kind::Double => Kind::Double,
            _ => {
                return Err(CollectiveError::UnsupportedDtype {
                    op: Op::AllReduceSum.name(),
                    kind,
                    expected: "f32, f64, bf16, f16",
                })
            }
        };
        if self.world_size == 1 {
            return Ok(());
        }
        if accumulate_in == Kind::Double {
            self.reduce_as::<f64>(tensor)
        } else {
            self.reduce_as::<f32>(tensor)
        }
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Tensor, CollectiveError> {
        let kind = tensor.f_kind()?;
        let device = tensor.device();
        let mut shape = tensor.size();
        if shape.is_empty() {
            shape.push(1);
        }
        if self.world_size == 1 {
            return Ok(tensor.f_reshape(&shape)?.copy());
        }
        let header = CallHeader::new(Op::AllGather, tensor, 0)?;
        let numel = tensor.numel();
        let part = numel * kind.elt_size_in_bytes();
        shape[0] *= self.world_size as i64;
        let mut gathered = Tensor::f_empty(&shape, (kind, Device::Cpu))?;
        let (rank, world_size) = (self.rank, self.world_size);
        {
            let out = host_bytes_mut(&mut gathered).expect("a fresh CPU tensor is contiguous");
            tensor.f_copy_data_u8(&mut out[rank * part..(rank + 1) * part], numel)?;
            self.run(Op::AllGather, header, |call| {
                ring_all_gather(call, rank, world_size, out, part)
            })?;
        }
        if device != Device::Cpu {
            gathered = gathered.f_to_device(device)?;
        }
        Ok(gathered)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.check_root(root)?;
        if self.world_size == 1 {
            return Ok(());
        }
        let kind = tensor.f_kind()?;
        let header = CallHeader::new(Op::Broadcast, tensor, root)?;
        let (rank, world_size) = (self.rank, self.world_size);
        if let Some(data) = host_bytes_mut(tensor) {
            return self.run(Op::Broadcast, header, |call| {
                ring_broadcast(call, rank, world_size, root, data)
            });
        }
        let numel = tensor.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        if rank == root {
            tensor.f_copy_data_u8(&mut data, numel)?;
        }
        self.run(Op::Broadcast, header, |call| {
            ring_broadcast(call, rank, world_size, root, &mut data)
        })?;
        if rank != root {
            write_host(tensor, &data, kind)?;
        }
        Ok(())
    }

    fn engine(&self) -> &'static str {
        "ring"
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        if let Some(links) = &self.links {
            let _ = links.next.shutdown(Shutdown::Both);
            let _ = links.prev.shutdown(Shutdown::Both);
        }
    }
}

/// One call in flight: the deadline, the sockets, and the first failure of either thread.
struct Call<'a> {
    op: &'static str,
    deadline: Instant,
    timeout: Duration,
    next: &'a TcpStream,
    prev: &'a TcpStream,
    next_rank: usize,
    prev_rank: usize,
    failure: Mutex<Option<CollectiveError>>,
}

impl Call<'_> {
    /// Time left before the deadline, or the timeout error naming `peer`.
    fn time_left(&self, peer: usize) -> Result<Duration, CollectiveError> {
        match self.deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(CollectiveError::Timeout {
                op: self.op,
                peer: Some(peer),
                after: self.timeout,
            }),
        }
    }

    fn io_error(&self, error: std::io::Error, peer: usize) -> CollectiveError {
        match error.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
                op: self.op,
                peer: Some(peer),
                after: self.timeout,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => CollectiveError::PeerDisconnected { op: self.op, peer },
            _ => CollectiveError::Io {
                op: self.op,
                peer,
                source: error,
            },
        }
    }

    /// Writes all of `bytes` to the next rank before the deadline.
    fn send(&self, mut bytes: &[u8]) -> Result<(), CollectiveError> {
        let peer = self.next_rank;
        let mut stream = self.next;
        while !bytes.is_empty() {
            let left = self.time_left(peer)?;
            stream
                .set_write_timeout(Some(left))
                .map_err(|e| self.io_error(e, peer))?;
            match stream.write(&bytes[..bytes.len().min(SEND_BLOCK_BYTES)]) {
                Ok(0) => return Err(CollectiveError::PeerDisconnected { op: self.op, peer }),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(self.io_error(e, peer)),
            }
        }
        Ok(())
    }

    /// Fills `buf` from the previous rank before the deadline.
    fn recv_exact(&self, mut buf: &mut [u8]) -> Result<(), CollectiveError> {
        let peer = self.prev_rank;
        let mut stream = self.prev;
        while !buf.is_empty() {
            let left = self.time_left(peer)?;
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_error(e, peer))?;
            match stream.read(buf) {
                Ok(0) => return Err(CollectiveError::PeerDisconnected { op: self.op, peer }),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(self.io_error(e, peer)),
            }
        }
        Ok(())
    }

    /// Receives `dst.len()` elements from the previous rank and adds them into `dst`, block by
    /// block. The incoming partial sum is the left operand, so each chunk is summed in ring order.
    fn recv_reduce<T: Element>(
        &self,
        dst: &mut [T],
        scratch: &mut [T],
    ) -> Result<(), CollectiveError> {
        for part in dst.chunks_mut(scratch.len().max(1)) {
            let incoming = &mut scratch[..part.len()];
            self.recv_exact(as_bytes_mut(incoming))?;
            for (d, s) in part.iter_mut().zip(incoming.iter()) {
                *d = *s + *d;
            }
        }
        Ok(())
    }

    /// Records the first failure of the call and shuts both sockets so that the other thread,
    /// and the neighbours, stop waiting.
    fn fail(&self, error: CollectiveError) {
        let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(error);
        }
        drop(first);
        self.shutdown();
    }

    fn shutdown(&self) {
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }

    fn take_failure(&self) -> Result<(), CollectiveError> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends `send` to the next rank on a helper thread while `recv` reads from the previous one.
    fn step(
        &self,
        send: &[u8],
        recv: impl FnOnce(&Self) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        std::thread::scope(|scope| {
            if !send.is_empty() {
                scope.spawn(|| {
                    if let Err(e) = self.send(send) {
                        self.fail(e);
                    }
                });
            }
            if let Err(e) = recv(self) {
                self.fail(e);
            }
        });
        self.take_failure()
    }

    /// Sends this rank's call header to the next rank and checks the previous rank's.
    fn exchange_header(&self, mine: &CallHeader) -> Result<(), CollectiveError> {
        self.send(&mine.encode())?;
        let mut buf = [0u8; HEADER_LEN];
        self.recv_exact(&mut buf)?;
        let theirs = CallHeader::decode(&buf).ok_or_else(|| CollectiveError::Mismatch {
            op: self.op,
            peer: self.prev_rank,
            detail: "sent a malformed call header".to_string(),
        })?;
        match mine.difference(&theirs) {
            None => Ok(()),
            Some(detail) => Err(CollectiveError::Mismatch {
                op: self.op,
                peer: self.prev_rank,
                detail,
            }),
        }
    }
}

fn is_retry(error: &std::io::Error) -> bool {
    // A socket timeout reports WouldBlock/TimedOut; the deadline check at the top of the loop
    // turns it into a timeout error.
    matches!(
        error.kind(),
        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
    )
}

/// Element range of chunk `c` when `n` elements are split into `parts` near-equal chunks.
fn chunk(n: usize, parts: usize, c: usize) -> Range<usize> {
    (c * n / parts)..((c + 1) * n / parts)
}

/// Disjoint `(&data[a], &mut data[b])`.
fn split_pair<T>(data: &mut [T], a: Range<usize>, b: Range<usize>) -> (&[T], &mut [T]) {
    if a.end <= b.start {
        let (low, high) = data.split_at_mut(b.start);
        (&low[a], &mut high[..b.end - b.start])
    } else {
        assert!(b.end <= a.start, "ring chunks {a:?} and {b:?} overlap");
        let (low, high) = data.split_at_mut(a.start);
        (&high[..a.end - a.start], &mut low[b])
    }
}

/// Reduce-scatter then all-gather; afterwards every rank holds the same sums.
fn ring_all_reduce<T: Element>(
    call: &Call<'_>,
    rank: usize,
    world_size: usize,
    data: &mut [T],
) -> Result<(), CollectiveError> {
    let (n, w) = (data.len(), world_size);
    let largest = (0..w).map(|c| chunk(n, w, c).len()).max().unwrap_or(0);
    let mut scratch = vec![T::default(); largest.min(RECV_BLOCK_BYTES / std::mem::size_of::<T>())];
    // Step s: send chunk (rank - s), receive and add chunk (rank - s - 1). Chunk c starts at
    // rank c and ends complete on rank c - 1.
    for s in 0..w - 1 {
        let send = (rank + w - s) % w;
        let recv = (rank + 2 * w - s - 1) % w;
        let (out, into) = split_pair(data, chunk(n, w, send), chunk(n, w, recv));
        call.step(as_bytes(out), |call| call.recv_reduce(into, &mut scratch))?;
    }
    // Fault injection: a rank dying between the two phases leaves its peers mid-collective.
    braid_coordinator::failpoint::hit_here("mid-all-reduce");
    // Step s: send chunk (rank + 1 - s), complete here, and receive chunk (rank - s).
    for s in 0..w - 1 {
        let send = (rank + 1 + w - s) % w;
        let recv = (rank + w - s) % w;
        let (out, into) = split_pair(data, chunk(n, w, send), chunk(n, w, recv));
        call.step(as_bytes(out), |call| call.recv_exact(as_bytes_mut(into)))?;
    }
    Ok(())
}

/// `out` holds `world_size` parts of `part` bytes with this rank's already in place.
fn ring_all_gather(
    call: &Call<'_>,
    rank: usize,
    world_size: usize,
    out: &mut [u8],
    part: usize,
) -> Result<(), CollectiveError> {
    let w = world_size;
    let range = |r: usize| r * part..(r + 1) * part;
    for s in 0..w - 1 {
        let send = (rank + w - s) % w;
        let recv = (rank + 2 * w - s - 1) % w;
        let (out, into) = split_pair(out, range(send), range(recv));
        call.step(out, |call| call.recv_exact(into))?;
    }
    Ok(())
}

/// The root sends; every other rank receives block by block and, unless the next rank is the
/// root, forwards each block while the following one arrives.
fn ring_broadcast(
    call: &Call<'_>,
    rank: usize,
    world_size: usize,
    root: usize,
    data: &mut [u8],
) -> Result<(), CollectiveError> {
    if rank == root {
        return call.send(data);
    }
    if (rank + 1) % world_size == root {
        return call.recv_exact(data);
    }
    std::thread::scope(|scope| {
        let (blocks, arrived) = mpsc::channel::<&[u8]>();
        scope.spawn(move || {
            for block in arrived {
                if let Err(e) = call.send(block) {
                    call.fail(e);
                    return;
                }
            }
        });
        for block in data.chunks_mut(PIPELINE_BLOCK_BYTES) {
            if let Err(e) = call.recv_exact(block) {
                call.fail(e);
                break;
            }
            let block: &[u8] = block;
            if blocks.send(block).is_err() {
                break;
            }
        }
    });
    call.take_failure()
}

/// Connects to `endpoint`, retrying refused connections until the deadline.
fn dial(endpoint: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = endpoint.to_socket_addrs()?.collect();
    let mut last_error =
        std::io::Error::new(ErrorKind::NotFound, "the endpoint resolves to no address");
    loop {
        for addr in &addrs {
            let Some(left) = remaining(deadline) else {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no connection before the deadline (last error: {last_error})"),
                ));
            };
            match TcpStream::connect_timeout(addr, left) {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = e,
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts connections until one presents `expected`; refuses the others with a reason code.
fn accept_peer(
    listener: &TcpListener,
    expected: &Hello,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let mut refused: Option<String> = None;
    loop {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false)?;
                let mut buf = [0u8; HELLO_LEN];
                // A real peer sends its hello right after connecting; don't let a silent
                // connection hold the listener until the deadline.
                let hello_deadline = deadline.min(Instant::now() + HELLO_WAIT);
                if read_before(&mut stream, &mut buf, hello_deadline).is_err() {
                    refused = Some(format!("{from} sent no handshake"));
                    continue;
                }
                let verdict =
                    Hello::decode(&buf).map_or(REFUSED_MAGIC, |hello| expected.verdict(&hello));
                // The refused peer learns why; a failed write only means it is already gone.
                let _ = write_before(&mut stream, &[verdict], deadline);
                if verdict == ACCEPTED {
                    return Ok(stream);
                }
                refused = Some(format!("refused {from}: {}", refusal_reason(verdict)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if remaining(deadline).is_none() {
                    let detail = match refused {
                        Some(r) => format!("timed out (last connection {r})"),
                        None => "timed out, nobody connected".to_string(),
                    };
                    return Err(std::io::Error::new(ErrorKind::TimedOut, detail));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(ErrorKind::TimedOut, "deadline passed")
}

fn read_before(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.set_read_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
        match stream.read(buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_before(stream: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
        match stream.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The first message on a ring connection, from the dialing rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    session: u64,
    rank: u32,
    world_size: u32,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut buf = [0u8; HELLO_LEN];
        buf[..8].copy_from_slice(&HELLO_MAGIC);
        buf[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        buf[12..20].copy_from_slice(&self.session.to_le_bytes());
        buf[20..24].copy_from_slice(&self.rank.to_le_bytes());
        buf[24..28].copy_from_slice(&self.world_size.to_le_bytes());
        buf
    }

    fn decode(buf: &[u8; HELLO_LEN]) -> Option<Hello> {
        if buf[..8] != HELLO_MAGIC || buf[8..12] != PROTOCOL_VERSION.to_le_bytes() {
            return None;
        }
        Some(Hello {
            session: u64::from_le_bytes(buf[12..20].try_into().unwrap()),
            rank: u32::from_le_bytes(buf[20..24].try_into().unwrap()),
            world_size: u32::from_le_bytes(buf[24..28].try_into().unwrap()),
        })
    }

    /// The answer to `theirs` when `self` is what the accepting rank expects.
    fn verdict(&self, theirs: &Hello) -> u8 {
        if theirs.session != self.session {
            REFUSED_SESSION
        } else if theirs.world_size != self.world_size {
            REFUSED_WORLD_SIZE
        } else if theirs.rank != self.rank {
            REFUSED_RANK
        } else {
            ACCEPTED
        }
    }
}

fn refusal_reason(code: u8) -> &'static str {
    match code {
        REFUSED_MAGIC => "not a braid ring handshake, or another protocol version",
        REFUSED_SESSION => "another session (a stale generation)",
        REFUSED_WORLD_SIZE => "another world size",
        REFUSED_RANK => "the listener expected another rank",
        _ => "unknown reason",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceSum = 1,
    AllGather = 2,
    Broadcast = 3,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        [Op::AllReduceSum, Op::AllGather, Op::Broadcast]
            .into_iter()
            .find(|op| *op as u8 == code)
    }
}

/// Every dtype, indexed by its wire code.
const KINDS: [Kind; 20] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::ComplexHalf,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
    Kind::Bool,
    Kind::QInt8,
    Kind::QUInt8,
    Kind::QInt32,
    Kind::BFloat16,
    Kind::Float8e5m2,
    Kind::Float8e4m3fn,
    Kind::Float8e5m2fnuz,
    Kind::Float8e4m3fnuz,
];

/// What a rank is about to do; neighbours compare theirs before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CallHeader {
    op: Op,
    kind: Kind,
    root: u32,
    sequence: u64,
    numel: u64,
    shape_hash: u64,
}

impl CallHeader {
    fn new(op: Op, tensor: &Tensor, root: usize) -> Result<CallHeader, CollectiveError> {
        // FNV-1a over the dims.
        let mut shape_hash = 0xcbf2_9ce4_8422_2325u64;
        for dim in tensor.size() {
            for byte in dim.to_le_bytes() {
                shape_hash = (shape_hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Ok(CallHeader {
            op,
            kind: tensor.f_kind()?,
            root: root as u32,
            sequence: 0,
            numel: tensor.numel() as u64,
            shape_hash,
        })
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let kind_code = KINDS
            .iter()
            .position(|k| *k == self.kind)
            .expect("every kind is listed");
        let mut buf = [0u8; HEADER_LEN];
        buf[..4].copy_from_slice(&CALL_MAGIC.to_le_bytes());
        buf[4] = self.op as u8;
        buf[5] = kind_code as u8;
        buf[8..12].copy_from_slice(&self.root.to_le_bytes());
        buf[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        buf[24..32].copy_from_slice(&self.numel.to_le_bytes());
        buf[32..40].copy_from_slice(&self.shape_hash.to_le_bytes());
        buf
    }

    fn decode(buf: &[u8; HEADER_LEN]) -> Option<CallHeader> {
        if buf[..4] != CALL_MAGIC.to_le_bytes() {
            return None;
        }
        Some(CallHeader {
            op: Op::from_code(buf[4])?,
            kind: *KINDS.get(usize::from(buf[5]))?,
            root: u32::from_le_bytes(buf[8..12].try_into().unwrap()),
            sequence: u64::from_le_bytes(buf[16..24].try_into().unwrap()),
            numel: u64::from_le_bytes(buf[24..32].try_into().unwrap()),
            shape_hash: u64::from_le_bytes(buf[32..40].try_into().unwrap()),
        })
    }

    /// What differs between this rank's call and the previous rank's, if anything.
    fn difference(&self, theirs: &CallHeader) -> Option<String> {
        let mut differences = Vec::new();
        if theirs.sequence != self.sequence {
            differences.push(format!(
                "it is at call #{}, this rank at call #{}",
                theirs.sequence, self.sequence
            ));
        }
        if theirs.op != self.op {
            differences.push(format!("it called {}", theirs.op.name()));
        }
        if theirs.kind != self.kind {
            differences.push(format!(
                "its dtype is {:?}, here {:?}",
                theirs.kind, self.kind
            ));
        }
        if theirs.numel != self.numel {
            differences.push(format!(
                "it has {} elements, here {}",
                theirs.numel, self.numel
            ));
        } else if theirs.shape_hash != self.shape_hash {
            differences.push("its shape differs".to_string());
        }
        if self.op == Op::Broadcast && theirs.root != self.root {
            differences.push(format!("its root is {}, here {}", theirs.root, self.root));
        }
        (!differences.is_empty()).then(|| differences.join("; "))
    }
}

/// Element types the ring sums: plain floats, valid for any bit pattern.
trait Element:
    tch::kind::Element + Copy + Default + Send + Sync + std::ops::Add<Output = Self>
{
}

impl Element for f32 {}

impl Element for f64 {}

fn as_bytes<T: Element>(data: &[T]) -> &[u8] {
    // SAFETY: f32/f64 have no padding; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

fn as_bytes_mut<T: Element>(data: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32/f64.
    unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(data))
    }
}

/// Whether the tensor's own memory can be used directly: CPU, contiguous, outside autograd.
fn is_plain_host(tensor: &Tensor) -> bool {
    tensor.device() == Device::Cpu && tensor.is_contiguous() && !tensor.requires_grad()
}

/// The elements of a contiguous CPU tensor of dtype `T`, in place.
fn host_elements_mut<T: Element>(tensor: &mut Tensor) -> Option<&mut [T]> {
    if tensor.kind() != T::KIND || !is_plain_host(tensor) {
        return None;
    }
    let numel = tensor.numel();
    if numel == 0 {
        return Some(&mut []);
    }
    // SAFETY: the tensor is a contiguous CPU tensor of `numel` elements of T starting at
    // data_ptr (which includes the storage offset), and `&mut Tensor` keeps it alive and
    // unmodified through this handle for the borrow.
    Some(unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<T>(), numel) })
}

/// The bytes of a contiguous CPU tensor, in place.
fn host_bytes_mut(tensor: &mut Tensor) -> Option<&mut [u8]> {
    if !is_plain_host(tensor) {
        return None;
    }
    let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
    if len == 0 {
        return Some(&mut []);
    }
    // SAFETY: as in host_elements_mut, viewed as bytes.
    Some(unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<u8>(), len) })
}

/// A host copy of the tensor's elements converted to T.
fn read_host_elements<T: Element>(tensor: &Tensor) -> Result<Vec<T>, CollectiveError> {
    let numel = tensor.numel();
    let mut data = vec![T::default(); numel];
    tensor.f_to_kind(T::KIND)?.f_copy_data(&mut data, numel)?;
    Ok(data)
}

/// Copies host bytes holding `kind` elements into `tensor` (any dtype, layout and device).
fn write_host(tensor: &mut Tensor, bytes: &[u8], kind: Kind) -> Result<(), CollectiveError> {
    let size = tensor.size();
    // SAFETY: `bytes` holds numel elements of `kind` and outlives `source`, which is dropped
    // at the end of this function after copy_ has read it.
    let source = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &size, &[], kind, Device::Cpu)? };
    tch::no_grad(|| tensor.f_copy_(&source))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_unevenly() {
        for (n, w) in [(0, 3), (1, 3), (7, 3), (10, 4), (1000003, 5)] {
            let ranges: Vec<_> = (0..w).map(|c| chunk(n, w, c)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[w - 1].end, n);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(pair[1].len().abs_diff(pair[0].len()) <= 1);
            }
        }
    }

    #[test]
    fn split_pair_handles_empty_and_either_order() {
        let mut data = [1, 2, 3, 4];
        let (a, b) = split_pair(&mut data, 0..0, 0..1);
        assert!(a.is_empty());
        assert_eq!(b, &mut [1]);
        let (a, b) = split_pair(&mut data, 2..4, 0..2);
        assert_eq!(a, &[3, 4]);
        b[0] = 9;
        assert_eq!(data, [9, 2, 3, 4]);
    }

    #[test]
    fn hello_and_header_round_trip() {
        let hello = Hello {
            session: 42,
            rank: 3,
            world_size: 5,
        };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        assert_eq!(
            hello.verdict(&Hello {
                session: 41,
                ..hello
            }),
            REFUSED_SESSION
        );
        assert_eq!(hello.verdict(&Hello { rank: 2, ..hello }), REFUSED_RANK);
        assert_eq!(hello.verdict(&hello), ACCEPTED);

        let t = Tensor::zeros([3, 4], (Kind::BFloat16, Device::Cpu));
        let header = CallHeader {
            sequence: 7,
            ..CallHeader::new(Op::Broadcast, &t, 2).unwrap()
        };
        assert_eq!(CallHeader::decode(&header.encode()), Some(header));
        assert_eq!(header.difference(&header), None);
        let other = CallHeader::new(Op::Broadcast, &t.view([4, 3]), 1).unwrap();
        let detail = header
            .difference(&CallHeader {
                sequence: 7,
                ..other
            })
            .unwrap();
        assert_eq!(detail, "its shape differs; its root is 1, here 2");
    }

    #[test]
    fn bind_accepts_a_bare_host() {
        let (listener, endpoint) = RingListener::bind("127.0.0.1").unwrap();
        assert!(endpoint.starts_with("127.0.0.1:"));
        assert_eq!(listener.endpoint(), endpoint);
        assert!(!endpoint.ends_with(":0"));
    }
}
