use crate::envelope::{Envelope, Protocol, Segment};
use crate::host::Host;
use crate::rt::Rt;
use crate::{config, TRACING_TARGET};

use rand::{Rng, RngCore};
use rand_distr::{Distribution, Exp};
use std::collections::VecDeque;
use std::io::{Error, ErrorKind, Result};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;

/// Describes the network topology.
pub(crate) struct Topology {
    config: config::Link,

    /// Specific configuration overrides between specific hosts.
    links: crate::FastMap<Pair, Link>,

    /// The network's time as of the last [`Topology::tick_by`]. Every host pair has a
    /// link, so most links carry nothing in most steps: only the links with messages in
    /// flight (`in_flight`) are ticked, and a link's own clock is brought up to this one
    /// whenever it is used, so it reads what ticking every link would have given it.
    /// (Bearman patch.)
    now: Instant,

    /// Indices of the links with sent messages (in flight or held): a superset, pruned as
    /// they empty, each listed once (its link's `listed_in_flight`), sorted when visited.
    /// A set kept ordered on every insert was 2 % of a 10,000-node run. (Bearman patch.)
    in_flight: Vec<usize>,

    /// For each host, the indices of the links that may hold messages ready for it: a
    /// superset, pruned as they are delivered, each listed once (its link's
    /// `listed_ready_for`). Delivering to a host visits these in increasing order, as a
    /// scan of its every link would. Every host has its entry from registration, in the
    /// world's order of hosts, so a step reaches it by the host's index. (Bearman patch.)
    ready_for: crate::FastMap<IpAddr, Vec<usize>>,

    /// We don't use a Rt for async. Right now, we just use it to tick time
    /// forward in the same way we do it elsewhere. We'd like to represent
    /// network state with async in the future.
    rt: Rt<'static>,
}

/// This type is used as the key in the [`Topology::links`] map. See [`new`]
/// which orders the addrs, such that this type uniquely identifies the link
/// between two hosts on the network.
#[derive(Debug, Clone, Hash, Eq, PartialEq)]
struct Pair(IpAddr, IpAddr);

impl Pair {
    fn new(a: IpAddr, b: IpAddr) -> Pair {
        assert_ne!(a, b);

        if a < b {
            Pair(a, b)
        } else {
            Pair(b, a)
        }
    }
}

/// An iterator for the network topology, providing access to all active links
/// in the simulated network.
pub struct LinksIter<'a> {
    iter: indexmap::map::IterMut<'a, Pair, Link>,
}

/// An iterator for the link, providing access to sent messages that have not
/// yet been delivered.
pub struct LinkIter<'a> {
    a: IpAddr,
    b: IpAddr,
    now: Instant,
    iter: std::collections::vec_deque::IterMut<'a, Sent>,
}

impl LinkIter<'_> {
    /// The [`IpAddr`] pair for the link. Always ordered to uniquely identify
    /// the link.
    pub fn pair(&self) -> (IpAddr, IpAddr) {
        (self.a, self.b)
    }

    /// Schedule all messages on the link for delivery the next time the
    /// simulation steps, consuming the iterator.
    pub fn deliver_all(self) {
        for sent in self {
            sent.deliver();
        }
    }
}

/// Provides a reference to a message that is currently inflight on the network
/// from one host to another.
pub struct SentRef<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    now: Instant,
    sent: &'a mut Sent,
}

impl SentRef<'_> {
    /// The (src, dst) [`SocketAddr`] pair for the message.
    pub fn pair(&self) -> (SocketAddr, SocketAddr) {
        (self.src, self.dst)
    }

    /// The message [`Protocol`].
    pub fn protocol(&self) -> &Protocol {
        &self.sent.protocol
    }

    /// Schedule the message for delivery the next time the simulation steps,
    /// consuming the item.
    pub fn deliver(self) {
        self.sent.deliver(self.now);
    }
}

impl<'a> Iterator for LinksIter<'a> {
    type Item = LinkIter<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let (pair, link) = self.iter.next()?;
        // The caller may schedule any of these messages for now: the next tick scans.
        // (Bearman patch.)
        link.earliest_due = Some(link.now);

        Some(LinkIter {
            a: pair.0,
            b: pair.1,
            now: link.now,
            iter: link.sent.iter_mut(),
        })
    }
}

impl<'a> Iterator for LinkIter<'a> {
    type Item = SentRef<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let sent = self.iter.next()?;

        Some(SentRef {
            src: sent.src,
            dst: sent.dst,
            now: self.now,
            sent,
        })
    }
}

/// A two-way link between two hosts on the network.
struct Link {
    /// The state of the link from node 'a' to node 'b'.
    /// Of the two nodes attached to a link, 'a' is the
    /// one whose ip address sorts smallest.
    state_a_b: State,
    /// The state of the link from node 'b' to node 'a'.
    /// Of the two nodes attached to a link, 'b' is the
    /// one whose ip address sorts greatest.
    state_b_a: State,

    /// Optional, per-link configuration.
    config: config::Link,

    /// Sent messages that are either scheduled for delivery in the future
    /// or are on hold.
    sent: VecDeque<Sent>,

    /// Messages that are ready to be delivered.
    deliverable: crate::FastMap<IpAddr, VecDeque<Envelope>>,

    /// The current network time, moved forward with [`Link::tick`].
    now: Instant,

    /// Whether this link's index is in the topology's `in_flight`. (Bearman patch.)
    listed_in_flight: bool,

    /// The ends under whose `ready_for` this link's index is listed. (Bearman patch.)
    listed_ready_for: Vec<IpAddr>,

    /// No message in `sent` is due before this (`None`: none is scheduled, all are held
    /// or there are none). A lower bound, exact after each scan: until then a tick or a
    /// send has nothing to move and skips the scan. (Bearman patch.)
    earliest_due: Option<Instant>,
}

/// States that a link between two nodes can be in.
#[derive(Clone, Copy)]
enum State {
    /// The link is healthy.
    Healthy,

    /// The link was explicitly partitioned.
    ExplicitPartition,

    /// The link was randomly partitioned.
    RandPartition,

    /// Messages are being held indefinitely.
    Hold,
}

impl Topology {
    pub(crate) fn new(config: config::Link) -> Topology {
        let rt = Rt::no_software();
        Topology {
            config,
            links: crate::FastMap::default(),
            now: rt.now(),
            in_flight: Vec::new(),
            ready_for: crate::FastMap::default(),
            rt,
        }
    }

    /// Registers a host, at the next index: the world's hosts are registered in the same
    /// order. (Bearman patch.)
    pub(crate) fn register_host(&mut self, addr: IpAddr) -> usize {
        self.ready_for.insert_full(addr, Vec::new()).0
    }

    /// Register a link between two hosts
    pub(crate) fn register(&mut self, a: IpAddr, b: IpAddr) {
        let pair = Pair::new(a, b);
        assert!(self.links.insert(pair, Link::new(self.rt.now())).is_none());
    }

    pub(crate) fn set_max_message_latency(&mut self, value: Duration) {
        self.config.latency_mut().max_message_latency = value;
    }

    pub(crate) fn set_link_message_latency(&mut self, a: IpAddr, b: IpAddr, value: Duration) {
        let pair = Pair::new(a, b);
        let latency = self
            .links
            .get_mut(&pair)
            .unwrap_or_else(|| panic!("unable to find link between {pair:?}"))
            .latency(self.config.latency());
        latency.min_message_latency = value;
        latency.max_message_latency = value;
    }

    pub(crate) fn set_link_max_message_latency(&mut self, a: IpAddr, b: IpAddr, value: Duration) {
        let pair = Pair::new(a, b);
        self.links
            .get_mut(&pair)
            .unwrap_or_else(|| panic!("unable to find link between {pair:?}"))
            .latency(self.config.latency())
            .max_message_latency = value;
    }

    pub(crate) fn set_message_latency_curve(&mut self, value: f64) {
        self.config.latency_mut().latency_distribution = Exp::new(value).unwrap();
    }

    pub(crate) fn set_fail_rate(&mut self, value: f64) {
        self.config.message_loss_mut().fail_rate = value;
    }

    pub(crate) fn set_link_fail_rate(&mut self, a: IpAddr, b: IpAddr, value: f64) {
        let pair = Pair::new(a, b);
        self.links
            .get_mut(&pair)
            .unwrap_or_else(|| panic!("unable to find link between {pair:?}"))
            .message_loss(self.config.message_loss())
            .fail_rate = value;
    }

    // Send a `message` from `src` to `dst`. This method returns immediately,
    // and message delivery happens at a later time (or never, if the link is
    // broken).
    pub(crate) fn enqueue_message(
        &mut self,
        rand: &mut dyn RngCore,
        src: SocketAddr,
        dst: SocketAddr,
        message: Protocol,
    ) -> Result<()> {
        if let Some((index, _, link)) = self.links.get_full_mut(&Pair::new(src.ip(), dst.ip())) {
            link.now = self.now;
            let result = link.enqueue_message(&self.config, rand, src, dst, message);
            self.note_link(index);
            result
        } else {
            Err(Error::new(
                ErrorKind::ConnectionRefused,
                "Connection refused",
            ))
        }
    }

    // Move messages from any network links to the `dst` host, the world's host at
    // `host_index` (its index in `ready_for` too).
    pub(crate) fn deliver_messages(
        &mut self,
        rand: &mut dyn RngCore,
        dst: &mut Host,
        host_index: usize,
    ) {
        let Some((addr, indices)) = self.ready_for.get_index_mut(host_index) else {
            return;
        };
        debug_assert_eq!(*addr, dst.addr, "topology and world list hosts alike");
        if indices.is_empty() {
            return;
        }
        // Only the links that may hold something for this host; the others would
        // deliver nothing. (Bearman patch.)
        let mut indices = std::mem::take(indices);
        indices.sort_unstable();
        for index in indices {
            let (_, link) = self
                .links
                .get_index_mut(index)
                .expect("links are never removed");
            link.listed_ready_for.retain(|end| *end != dst.addr);
            link.now = self.now;
            link.deliver_messages(&self.config, rand, dst);
            self.note_link(index);
        }
    }

    /// Records what link `index` now holds: whether it has messages in flight, and for
    /// which of its ends it has messages ready. (Bearman patch.)
    fn note_link(&mut self, index: usize) {
        let (_, link) = self
            .links
            .get_index_mut(index)
            .expect("links are never removed");
        list_in_flight(&mut self.in_flight, index, link);
        for (host, queue) in &link.deliverable {
            if !queue.is_empty() && !link.listed_ready_for.contains(host) {
                link.listed_ready_for.push(*host);
                self.ready_for.entry(*host).or_default().push(index);
            }
        }
    }

    pub(crate) fn hold(&mut self, a: IpAddr, b: IpAddr) {
        self.get_link_mut(&Pair::new(a, b)).hold();
    }

    pub(crate) fn release(&mut self, a: IpAddr, b: IpAddr) {
        self.get_link_mut(&Pair::new(a, b)).release();
    }

    pub(crate) fn partition(&mut self, a: IpAddr, b: IpAddr) {
        self.get_link_mut(&Pair::new(a, b)).explicit_partition();
    }

    pub(crate) fn partition_oneway(&mut self, a: IpAddr, b: IpAddr) {
        let link = &mut self.get_link_mut(&Pair::new(a, b));
        link.partition_oneway(a, b);
    }

    pub(crate) fn repair(&mut self, a: IpAddr, b: IpAddr) {
        self.get_link_mut(&Pair::new(a, b)).explicit_repair();
    }

    pub(crate) fn repair_oneway(&mut self, a: IpAddr, b: IpAddr) {
        let link = &mut self.get_link_mut(&Pair::new(a, b));
        link.repair_oneway(a, b);
    }

    pub(crate) fn tick_by(&mut self, duration: Duration, skip_idle: bool) {
        // The topology's runtime runs no software: it is only a clock, and with idle
        // hosts skipped it is moved on exactly as an empty tick would. (Bearman patch.)
        if skip_idle && duration.subsec_nanos() % 1_000_000 == 0 {
            self.rt.skip_idle(1, duration);
        } else {
            let _ = self.rt.tick(duration);
        }
        // One clock read per step, not one per link: reading it enters the runtime.
        // (Bearman patch.)
        let now = self.rt.now();
        self.now = now;
        let mut listed = std::mem::take(&mut self.in_flight);
        listed.sort_unstable();
        for index in listed {
            let (_, link) = self
                .links
                .get_index_mut(index)
                .expect("links are never removed");
            link.listed_in_flight = false;
            if link.tick(now) {
                self.note_link(index);
            } else {
                // Nothing became deliverable: what is ready for each end is listed
                // already. (Bearman patch.)
                list_in_flight(&mut self.in_flight, index, link);
            }
        }
    }

    pub(crate) fn iter_mut(&mut self) -> LinksIter<'_> {
        // What the caller does to a link's messages is only seen at the next tick: keep
        // every link with messages ticked, with its clock current. (Bearman patch.)
        for (index, link) in self.links.values_mut().enumerate() {
            link.now = self.now;
            list_in_flight(&mut self.in_flight, index, link);
        }
        LinksIter {
            iter: self.links.iter_mut(),
        }
    }

    #[inline]
    fn get_link_mut(&mut self, pair: &Pair) -> &mut Link {
        let (index, _, link) = self
            .links
            .get_full_mut(pair)
            .unwrap_or_else(|| panic!("unable to find link between {pair:?}"));
        link.now = self.now;
        // Whatever is done to it (hold, release, partition, repair), the next tick looks
        // at it. (Bearman patch.)
        list_in_flight(&mut self.in_flight, index, link);
        link
    }
}

/// Lists link `index` in `in_flight` if it has sent messages and is not listed yet.
/// (Bearman patch.)
fn list_in_flight(in_flight: &mut Vec<usize>, index: usize, link: &mut Link) {
    if !link.sent.is_empty() && !link.listed_in_flight {
        link.listed_in_flight = true;
        in_flight.push(index);
    }
}

/// Represents a message sent between two hosts on the network.
struct Sent {
    src: SocketAddr,
    dst: SocketAddr,
    status: DeliveryStatus,
    protocol: Protocol,
}

impl Sent {
    fn deliver(&mut self, now: Instant) {
        self.status = DeliveryStatus::DeliverAfter(now);
    }
}

enum DeliveryStatus {
    DeliverAfter(Instant),
    Hold,
}

impl Link {
    fn new(now: Instant) -> Link {
        Link {
            state_a_b: State::Healthy,
            state_b_a: State::Healthy,
            config: config::Link::default(),
            sent: VecDeque::new(),
            deliverable: crate::FastMap::default(),
            listed_in_flight: false,
            listed_ready_for: Vec::new(),
            earliest_due: None,
            now,
        }
    }

    fn enqueue_message(
        &mut self,
        global_config: &config::Link,
        rand: &mut dyn RngCore,
        src: SocketAddr,
        dst: SocketAddr,
        message: Protocol,
    ) -> Result<()> {
        tracing::trace!(target: TRACING_TARGET, ?src, ?dst, protocol = %message, "Send");

        self.rand_partition_or_repair(global_config, rand);
        let result = self.enqueue(global_config, rand, src, dst, message);
        self.process_deliverables();
        result
    }

    fn get_state_for_message(&self, src: IpAddr, dst: IpAddr) -> State {
        // Between each pair of ip-addresses there can exist a link.
        // A link between two such pairs can be constructed as
        // Pair::new(x,y) or Pair::new(y,x). These two expressions create
        // the exact same link. We denote one of the ends of the link as 'a',
        // and the other 'b'. 'a' is always the one that compares smaller, i.e,
        // `a < b` holds.
        if src < dst {
            self.state_a_b
        } else {
            self.state_b_a
        }
    }

    // src -> link -> dst
    //        ^-- you are here!
    //
    // Messages may be dropped, sit on the link for a while (due to latency, or
    // because the link has stalled), or be delivered immediately.
    // Link will return an Err(()) if the socket buffer is full.
    fn enqueue(
        &mut self,
        global_config: &config::Link,
        rand: &mut dyn RngCore,
        src: SocketAddr,
        dst: SocketAddr,
        message: Protocol,
    ) -> Result<()> {
        let state = self.get_state_for_message(src.ip(), dst.ip());
        let status = match state {
            State::Healthy => {
                let delay = self.delay(global_config.latency(), rand);
                let due = self.now + delay;
                self.note_due(due);
                DeliveryStatus::DeliverAfter(due)
            }
            // Only A->B is blocked, so B can send, so we can send if src is B
            State::Hold => {
                tracing::trace!(target: TRACING_TARGET,?src, ?dst, protocol = %message, "Hold");
                DeliveryStatus::Hold
            }
            _ => {
                tracing::trace!(target: TRACING_TARGET,?src, ?dst, protocol = %message, "Drop");
                return Ok(());
            }
        };

        let sent = Sent {
            src,
            dst,
            status,
            protocol: message,
        };

        self.sent.push_back(sent);
        Ok(())
    }

    /// Moves the link's clock to `now`; whether that made any message deliverable.
    fn tick(&mut self, now: Instant) -> bool {
        self.now = now;
        self.process_deliverables()
    }

    /// Moves the messages due by now to `deliverable`, in the order they were sent;
    /// whether there were any.
    fn process_deliverables(&mut self) -> bool {
        match self.earliest_due {
            Some(due) if due <= self.now => {}
            _ => return false,
        }
        let now = self.now;
        let mut earliest_due: Option<Instant> = None;
        let mut moved = false;
        let deliverable = &mut self.deliverable;
        // One pass that keeps the order of both what stays and what moves: removing each
        // due message from the middle of the queue shifted the rest every time.
        // (Bearman patch.)
        self.sent.retain_mut(|sent| match sent.status {
            DeliveryStatus::DeliverAfter(time) if time <= now => {
                // The message moves out; the placeholder goes with the removed entry.
                let message = std::mem::replace(&mut sent.protocol, Protocol::Tcp(Segment::Rst));
                deliverable
                    .entry(sent.dst.ip())
                    .or_default()
                    .push_back(Envelope {
                        src: sent.src,
                        dst: sent.dst,
                        message,
                    });
                moved = true;
                false
            }
            DeliveryStatus::DeliverAfter(time) => {
                earliest_due = Some(earliest_due.map_or(time, |due| due.min(time)));
                true
            }
            DeliveryStatus::Hold => true,
        });
        self.earliest_due = earliest_due;
        moved
    }

    /// Lowers `earliest_due` to `time`, for a message now scheduled then. (Bearman patch.)
    fn note_due(&mut self, time: Instant) {
        self.earliest_due = Some(self.earliest_due.map_or(time, |due| due.min(time)));
    }

    // FIXME: This implementation does not respect message delivery order. If
    // host A and host B are ordered (by addr), and B sends before A, then this
    // method will deliver A's message before B's.
    fn deliver_messages(
        &mut self,
        global_config: &config::Link,
        rand: &mut dyn RngCore,
        host: &mut Host,
    ) {
        // Nothing queued for this host (the usual case, asked every step for every
        // link): no entry inserted, nothing collected. (Bearman patch.)
        // At most two queues (one per end), so this check costs no hashing.
        if self.deliverable.values().all(VecDeque::is_empty) {
            return;
        }
        let Some(queue) = self.deliverable.get_mut(&host.addr) else {
            return;
        };
        if queue.is_empty() {
            return;
        }
        // Taken whole (a reset sent back below goes to the other end's queue, never
        // this one), and its buffer handed back after: no list collected per delivery.
        // (Bearman patch.)
        let mut deliverable = std::mem::take(queue);

        for message in deliverable.drain(..) {
            let (src, dst) = (message.src, message.dst);
            if let Err(message) = host.receive_from_network(message) {
                let _ = self.enqueue_message(global_config, rand, dst, src, message);
            }
        }
        if let Some(queue) = self.deliverable.get_mut(&host.addr) {
            if queue.is_empty() {
                *queue = deliverable;
            }
        }
    }

    // Randomly break or repair this link.
    fn rand_partition_or_repair(&mut self, global_config: &config::Link, rand: &mut dyn RngCore) {
        let do_rand = self.rand_partition(global_config.message_loss(), rand);
        match (self.state_a_b, self.state_b_a) {
            (State::Healthy, _) | (_, State::Healthy) if do_rand => {
                self.state_a_b = State::RandPartition;
                self.state_b_a = State::RandPartition;

                self.sent.clear();
            }
            (State::RandPartition, _) | (_, State::RandPartition)
                if self.rand_repair(global_config.message_loss(), rand) =>
            {
                self.release();
            }
            _ => {}
        }
    }

    fn hold(&mut self) {
        self.state_a_b = State::Hold;
        self.state_b_a = State::Hold;

        for sent in &mut self.sent {
            sent.status = DeliveryStatus::Hold;
        }
        self.earliest_due = None;
    }

    // This link becomes healthy, and any held messages are scheduled for delivery.
    fn release(&mut self) {
        self.state_a_b = State::Healthy;
        self.state_b_a = State::Healthy;
        for sent in &mut self.sent {
            if let DeliveryStatus::Hold = sent.status {
                sent.deliver(self.now);
            }
        }
        self.note_due(self.now);
    }

    fn explicit_partition(&mut self) {
        self.state_a_b = State::ExplicitPartition;
        self.state_b_a = State::ExplicitPartition;

        self.sent.clear();
    }

    fn partition_oneway(&mut self, from: IpAddr, to: IpAddr) {
        if from < to {
            self.state_a_b = State::ExplicitPartition;
        } else {
            self.state_b_a = State::ExplicitPartition;
        }

        self.sent.retain(|sent| sent.src.ip() != from);
    }

    fn repair_oneway(&mut self, from: IpAddr, to: IpAddr) {
        if from < to {
            self.state_a_b = State::Healthy;
        } else {
            self.state_b_a = State::Healthy;
        }
    }

    // Repair the link, without releasing any held messages.
    fn explicit_repair(&mut self) {
        self.state_a_b = State::Healthy;
        self.state_b_a = State::Healthy;
    }

    /// Should the link be randomly partitioned
    fn rand_partition(&self, global: &config::MessageLoss, rand: &mut dyn RngCore) -> bool {
        let config = self.config.message_loss.as_ref().unwrap_or(global);
        let fail_rate = config.fail_rate;
        fail_rate > 0.0 && rand.random_bool(fail_rate)
    }

    fn rand_repair(&self, global: &config::MessageLoss, rand: &mut dyn RngCore) -> bool {
        let config = self.config.message_loss.as_ref().unwrap_or(global);
        let repair_rate = config.repair_rate;
        repair_rate > 0.0 && rand.random_bool(repair_rate)
    }

    fn delay(&self, global: &config::Latency, rand: &mut dyn RngCore) -> Duration {
        let config = self.config.latency.as_ref().unwrap_or(global);

        let mult = config.latency_distribution.sample(rand);
        let range = (config.max_message_latency - config.min_message_latency).as_millis() as f64;
        let delay = config.min_message_latency + Duration::from_millis((range * mult) as _);

        std::cmp::min(delay, config.max_message_latency)
    }

    fn latency(&mut self, global: &config::Latency) -> &mut config::Latency {
        self.config.latency.get_or_insert_with(|| global.clone())
    }

    fn message_loss(&mut self, global: &config::MessageLoss) -> &mut config::MessageLoss {
        self.config
            .message_loss
            .get_or_insert_with(|| global.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Link;

    use super::*;

    #[test]
    #[should_panic(expected = "unable to find link between Pair(10.0.0.1, 192.168.0.1)")]
    fn link_access_gives_useful_panic_message() {
        let mut topo = Topology::new(Link::default());
        topo.hold("10.0.0.1".parse().unwrap(), "192.168.0.1".parse().unwrap());
    }
}
