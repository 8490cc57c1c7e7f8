//! The MPI transport (feature `mpi`): tensors and pipeline packets as point-to-point messages
//! between ranks of `MPI_COMM_WORLD`, through rsmpi on the system's MPI.
//!
//! A tensor is two or more messages with the same tag: its header (`wire::Header` as `i64`s),
//! then its bytes, from a host buffer (at most [`CHUNK`] bytes per message, as MPI counts are
//! `int`). A CUDA tensor is copied to the host before sending and back to the device after
//! receipt; a CUDA-aware MPI could take the device pointer directly and skip both copies.
//! Messages between two ranks with one tag arrive in the order they were sent (MPI's
//! non-overtaking rule), which is all the ordering the pipeline needs.
use super::wire::Header;
pub use crate::pipeline::Packet;
use crate::{Error, Result};
use mpi::Threading;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, Rank, SimpleCommunicator};
use tch::{Device, Tensor};

/// Message tag of the pipeline's forward packets (activations, labels, forwarded gradients).
pub const TAG_PACKET: i32 = 1;
/// Message tag of gradients sent backwards (sender-side SGR).
pub const TAG_BACK: i32 = 2;
/// Message tag of variables and optimizer state gathered at drain points.
pub const TAG_STATE: i32 = 3;
/// Message tag of per-step statistics gathered at drain points.
pub const TAG_STATS: i32 = 4;
/// Message tag of the self-test's tensors (`sgr internal-mpi-selftest`).
pub const TAG_TEST: i32 = 9;

/// Largest payload of one message, in bytes: MPI's counts are C `int`s, so a tensor of 2 GiB
/// or more goes in several messages.
pub const CHUNK: usize = 1 << 30;

/// This process's MPI session: initialised once, finalised when dropped.
pub struct Mpi {
    // Dropping the universe calls MPI_Finalize; it must outlive `world`.
    world: SimpleCommunicator,
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI. Only the thread that calls this makes MPI calls (libtorch's own
    /// threads never do), which is MPI_THREAD_FUNNELED.
    pub fn init() -> Result<Mpi> {
        if mpi::environment::is_initialized() {
            return Err(Error::Config(
                "distributed: MPI was already initialised in this process".into(),
            ));
        }
        let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Config("distributed: MPI initialisation failed".into()))?;
        if level < Threading::Funneled {
            return Err(Error::Config(format!(
                "distributed: this MPI offers thread support {level:?}, sgr needs Funneled"
            )));
        }
        let world = universe.world();
        Ok(Mpi {
            world,
            _universe: universe,
        })
    }

    /// The world communicator.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// This process's rank in the world.
    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    /// Number of ranks in the world.
    pub fn size(&self) -> usize {
        self.world.size() as usize
    }

    /// Ends the whole job: prints `error: <e>` (one line, with this rank) and calls MPI_Abort,
    /// which makes mpirun kill every rank and exit non-zero. Used for an error on one rank
    /// that the others cannot know about: they would otherwise wait for its messages forever.
    pub fn abort(&self, e: &dyn std::fmt::Display) -> ! {
        eprintln!(
            "error: rank {}: {}",
            self.rank(),
            e.to_string().replace('\n', " ")
        );
        self.world.abort(1)
    }
}

/// `t` as contiguous host memory (a no-op for a contiguous CPU tensor).
fn host(t: &Tensor) -> Tensor {
    let t = if t.device() == Device::Cpu {
        t.shallow_clone()
    } else {
        t.to_device(Device::Cpu)
    };
    t.contiguous()
}

/// Sends `buf` to `to` in messages of at most [`CHUNK`] bytes.
fn send_bytes(comm: &SimpleCommunicator, to: Rank, tag: i32, buf: &[u8]) {
    let dest = comm.process_at_rank(to);
    if buf.is_empty() {
        dest.send_with_tag(buf, tag);
    }
    for part in buf.chunks(CHUNK) {
        dest.send_with_tag(part, tag);
    }
}

/// Receives exactly `buf.len()` bytes from `from`, sent by [`send_bytes`].
fn recv_bytes(comm: &SimpleCommunicator, from: Rank, tag: i32, buf: &mut [u8]) -> Result<()> {
    let src = comm.process_at_rank(from);
    let check = |want: usize, status: mpi::point_to_point::Status| {
        let got = status.count(u8::equivalent_datatype()) as usize;
        if got != want {
            return Err(Error::Config(format!(
                "distributed: expected {want} bytes from rank {from}, received {got}"
            )));
        }
        Ok(())
    };
    if buf.is_empty() {
        let status = src.receive_into_with_tag(&mut buf[..], tag);
        return check(0, status);
    }
    for part in buf.chunks_mut(CHUNK) {
        let want = part.len();
        let status = src.receive_into_with_tag(part, tag);
        check(want, status)?;
    }
    Ok(())
}

/// The bytes of a contiguous CPU tensor.
fn bytes_of(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor (see `host`) of `len` bytes that lives as long as
    // the borrow; its storage is not written while the slice exists (nothing else holds it).
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// Sends `t` (any device, any layout) to rank `to`: its header, then its bytes.
pub fn send_tensor(comm: &SimpleCommunicator, to: Rank, tag: i32, t: &Tensor) -> Result<()> {
    let header = Header {
        kind: t.kind(),
        shape: t.size(),
    }
    .encode()?;
    let h = host(t);
    comm.process_at_rank(to).send_with_tag(&header[..], tag);
    send_bytes(comm, to, tag, bytes_of(&h));
    Ok(())
}

/// Receives a tensor sent by [`send_tensor`] from rank `from` and puts it on `device`.
pub fn recv_tensor(
    comm: &SimpleCommunicator,
    from: Rank,
    tag: i32,
    device: Device,
) -> Result<Tensor> {
    let (v, _) = comm.process_at_rank(from).receive_vec_with_tag::<i64>(tag);
    let header = Header::decode(&v)?;
    let t = Tensor::empty(header.shape.as_slice(), (header.kind, Device::Cpu));
    let len = header.byte_len();
    if len > 0 {
        // SAFETY: `t` was just allocated, contiguous on the CPU, with exactly `len` bytes, and
        // nothing else refers to it while MPI writes into it.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
        recv_bytes(comm, from, tag, buf)?;
    } else {
        recv_bytes(comm, from, tag, &mut [])?;
    }
    Ok(if device == Device::Cpu {
        t
    } else {
        t.to_device(device)
    })
}

/// Sends a list of `i64`s (indices, flags, counts).
pub fn send_i64s(comm: &SimpleCommunicator, to: Rank, tag: i32, v: &[i64]) {
    comm.process_at_rank(to).send_with_tag(v, tag);
}

/// Receives a list of `i64`s sent by [`send_i64s`].
pub fn recv_i64s(comm: &SimpleCommunicator, from: Rank, tag: i32) -> Vec<i64> {
    comm.process_at_rank(from)
        .receive_vec_with_tag::<i64>(tag)
        .0
}

/// First word of a packet's leading message: a batch follows.
const PACKET_BATCH: i64 = 1;
/// First word of a packet's leading message: the segment ends (the pipeline drains).
const PACKET_END: i64 = 0;

/// Sends a packet, or with `None` the end of a segment, to rank `to`: one message
/// `[kind, index, has forwarded, has images]`, then the tensors in field order.
pub fn send_packet(comm: &SimpleCommunicator, to: Rank, p: Option<&Packet>) -> Result<()> {
    let Some(p) = p else {
        send_i64s(comm, to, TAG_PACKET, &[PACKET_END, 0, 0, 0]);
        return Ok(());
    };
    send_i64s(
        comm,
        to,
        TAG_PACKET,
        &[
            PACKET_BATCH,
            p.index as i64,
            p.forwarded.is_some() as i64,
            p.images.is_some() as i64,
        ],
    );
    send_tensor(comm, to, TAG_PACKET, &p.h)?;
    if let Some(f) = &p.forwarded {
        send_tensor(comm, to, TAG_PACKET, f)?;
    }
    send_tensor(comm, to, TAG_PACKET, &p.labels)?;
    if let Some(x) = &p.images {
        send_tensor(comm, to, TAG_PACKET, x)?;
    }
    Ok(())
}

/// Receives what [`send_packet`] sent: a packet with its tensors on `device`, or `None` at the
/// end of a segment.
pub fn recv_packet(
    comm: &SimpleCommunicator,
    from: Rank,
    device: Device,
) -> Result<Option<Packet>> {
    let head = recv_i64s(comm, from, TAG_PACKET);
    match head.as_slice() {
        [PACKET_END, ..] => Ok(None),
        &[PACKET_BATCH, index, has_forwarded, has_images] if index >= 0 => {
            let h = recv_tensor(comm, from, TAG_PACKET, device)?;
            let forwarded = if has_forwarded != 0 {
                Some(recv_tensor(comm, from, TAG_PACKET, device)?)
            } else {
                None
            };
            let labels = recv_tensor(comm, from, TAG_PACKET, device)?;
            let images = if has_images != 0 {
                Some(recv_tensor(comm, from, TAG_PACKET, device)?)
            } else {
                None
            };
            Ok(Some(Packet {
                index: index as usize,
                h,
                forwarded,
                labels,
                images,
            }))
        }
        other => Err(Error::Config(format!(
            "distributed: bad packet header {other:?} from rank {from}"
        ))),
    }
}

/// `a` and `b` have the same kind, shape and bits.
pub fn identical(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind() && a.size() == b.size() && {
        let (a, b) = (host(a), host(b));
        bytes_of(&a) == bytes_of(&b)
    }
}

/// Broadcasts a byte string from rank 0 of `comm` to every rank (its length first);
/// `bytes` is read on rank 0 only.
pub fn broadcast_bytes(comm: &SimpleCommunicator, bytes: &[u8]) -> Vec<u8> {
    use mpi::collective::Root;
    let root = comm.process_at_rank(0);
    let mut len = [bytes.len() as u64];
    root.broadcast_into(&mut len[..]);
    let mut buf = if comm.rank() == 0 {
        bytes.to_vec()
    } else {
        vec![0u8; len[0] as usize]
    };
    for part in buf.chunks_mut(CHUNK) {
        root.broadcast_into(part);
    }
    buf
}

/// Replaces `t` (a float tensor of the same shape on every rank of `comm`) by the mean of the
/// ranks' tensors: an all-reduce sum over host buffers, divided by the number of ranks.
/// Every rank ends with the same bits (MPI's reduction is deterministic for a fixed
/// communicator, and every rank divides the same sum by the same number).
pub fn all_reduce_mean(comm: &SimpleCommunicator, t: &mut Tensor) -> Result<()> {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    let n = comm.size();
    if n == 1 {
        return Ok(());
    }
    let src = host(t);
    let sum = Tensor::empty(src.size().as_slice(), (src.kind(), Device::Cpu));
    let len = src.numel();
    if len > i32::MAX as usize {
        return Err(Error::Config(format!(
            "distributed: {len} gradient elements exceed one MPI all-reduce"
        )));
    }
    // SAFETY: `src` and `sum` are distinct contiguous CPU tensors of `len` elements of the
    // slice type, alive for the whole call.
    unsafe {
        match src.kind() {
            tch::Kind::Float => comm.all_reduce_into(
                std::slice::from_raw_parts(src.data_ptr() as *const f32, len),
                std::slice::from_raw_parts_mut(sum.data_ptr() as *mut f32, len),
                SystemOperation::sum(),
            ),
            tch::Kind::Double => comm.all_reduce_into(
                std::slice::from_raw_parts(src.data_ptr() as *const f64, len),
                std::slice::from_raw_parts_mut(sum.data_ptr() as *mut f64, len),
                SystemOperation::sum(),
            ),
            k => {
                return Err(Error::Config(format!(
                    "distributed: cannot all-reduce gradients of kind {k:?}"
                )));
            }
        }
    }
    let mean = sum / n as f64;
    tch::no_grad(|| t.copy_(&mean));
    Ok(())
}

/// Sends named tensors (variables, optimizer state): their count and names as one message of
/// `\n`-separated UTF-8, then each tensor.
pub fn send_named(
    comm: &SimpleCommunicator,
    to: Rank,
    tag: i32,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let joined = names.join("\n");
    let dest = comm.process_at_rank(to);
    dest.send_with_tag(&[tensors.len() as u64][..], tag);
    dest.send_with_tag(joined.as_bytes(), tag);
    for (_, t) in tensors {
        send_tensor(comm, to, tag, t)?;
    }
    Ok(())
}

/// Receives what [`send_named`] sent, with the tensors on `device`.
pub fn recv_named(
    comm: &SimpleCommunicator,
    from: Rank,
    tag: i32,
    device: Device,
) -> Result<Vec<(String, Tensor)>> {
    let src = comm.process_at_rank(from);
    let (count, _) = src.receive_vec_with_tag::<u64>(tag);
    let (names, _) = src.receive_vec_with_tag::<u8>(tag);
    let names = String::from_utf8(names)
        .map_err(|_| Error::Config(format!("distributed: bad tensor names from rank {from}")))?;
    let count = count.first().copied().unwrap_or(0) as usize;
    let names: Vec<String> = if count == 0 {
        Vec::new()
    } else {
        names.split('\n').map(String::from).collect()
    };
    if names.len() != count {
        return Err(Error::Config(format!(
            "distributed: rank {from} announced {count} tensors but named {}",
            names.len()
        )));
    }
    names
        .into_iter()
        .map(|n| Ok((n, recv_tensor(comm, from, tag, device)?)))
        .collect()
}

/// Sends a list of `f64`s (step statistics).
pub fn send_f64s(comm: &SimpleCommunicator, to: Rank, tag: i32, v: &[f64]) {
    comm.process_at_rank(to).send_with_tag(v, tag);
}

/// Receives a list of `f64`s sent by [`send_f64s`].
pub fn recv_f64s(comm: &SimpleCommunicator, from: Rank, tag: i32) -> Vec<f64> {
    comm.process_at_rank(from)
        .receive_vec_with_tag::<f64>(tag)
        .0
}
