//! [`Gather`]: a writer that sends what one request's frames add up to in one system call.
//!
//! hyper's HTTP/2 client writes a unary gRPC call as three flushes: the HEADERS frame, then
//! the DATA frame (h2 gives a new stream its send window only once its HEADERS are out, so
//! the body goes from a task of its own), then an empty DATA frame with END_STREAM (tonic's
//! body ends one poll after its message). Three `writev` calls, and the daemon at the other
//! end wakes up to three times for one call. On the authorize path, where dnsd holds a DNS
//! answer until fwd replies, that is latency on every first-sight answer.
//!
//! [`Prompt`] makes the body say that it has ended together with its last DATA frame, so
//! that END_STREAM rides on that frame instead of an empty frame of its own, and
//! `Gather` keeps what is written in a buffer and, at a flush, lets the other ready tasks
//! run once (it wakes itself and returns `Pending` a single time) before it writes: the
//! body task's frames land in the same buffer, and the lot leaves in one `write`. A flush
//! that finds the buffer empty costs nothing, and a second flush in a row writes at once, so
//! nothing is held longer than one turn of the scheduler.
//!
//! The yield is made only on a current-thread runtime (dnsd with `threads = 1`), where the
//! ready tasks run in order on the one thread. On a multi-thread runtime a task that wakes
//! itself makes tokio wake an idle worker, which may take the connection task and run it
//! beside the body task: a thread wake-up for nothing, and no sure gain. There `Gather`
//! writes at each flush, and a call takes two writes (`Prompt` still saves the third).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered octets beyond which a write first sends what is held, so that the buffer does
/// not keep growing while writes come faster than flushes. (One write larger than this is
/// still copied whole; h2 hands over frames of at most 16 KiB.)
const HOLD_MAX: usize = 64 * 1024;

/// Wraps a stream: reads pass through, writes are gathered until a flush (see the module
/// documentation).
#[derive(Debug)]
pub(crate) struct Gather<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    sent: usize,
    /// A flush has already yielded once for what `buf` holds.
    yielded: bool,
    /// Whether a flush yields first: only on a current-thread runtime (module documentation).
    yield_first: bool,
}

impl<T> Gather<T> {
    pub(crate) fn new(inner: T) -> Self {
        let yield_first = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        Gather {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
            yield_first,
        }
    }
}

impl<T: AsyncWrite + Unpin> Gather<T> {
    /// Writes everything held; `Ready(Ok)` once the buffer is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.buf.get(self.sent..).filter(|r| !r.is_empty()) {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room: sends what is held when it has grown past [`HOLD_MAX`].
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= HOLD_MAX {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gather<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gather<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            me.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.yield_first && me.buf.len() > me.sent && !me.yielded {
            // Let the tasks that were woken with this one (the request body's) add their
            // frames first; this task runs again right after them.
            me.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

/// A request body that looks one frame ahead, so that it can tell that it has ended as soon
/// as its last frame is taken (hyper then marks that DATA frame END_STREAM). tonic's encoded
/// body only learns that its message stream is over at the next poll, which made hyper
/// send an empty END_STREAM frame, and a write, of its own.
#[derive(Debug)]
pub(crate) struct Prompt<B: Body> {
    inner: B,
    /// A frame read ahead, to hand out next.
    ahead: Option<Result<Frame<B::Data>, B::Error>>,
    ended: bool,
}

impl<B: Body> Prompt<B> {
    pub(crate) fn new(inner: B) -> Self {
        Prompt {
            inner,
            ahead: None,
            ended: false,
        }
    }
}

// Nothing in a Prompt is ever pinned: the frame read ahead is only moved in and out.
impl<B: Body + Unpin> Unpin for Prompt<B> {}

impl<B: Body + Unpin> Body for Prompt<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let me = self.get_mut();
        let frame = match me.ahead.take() {
            Some(f) => f,
            None if me.ended => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut me.inner).poll_frame(cx)) {
                Some(f) => f,
                None => {
                    me.ended = true;
                    return Poll::Ready(None);
                }
            },
        };
        if frame.is_err() {
            // Nothing is read after an error.
            me.ended = true;
        } else {
            // Look ahead once: if the body is over now, say so with this frame.
            match Pin::new(&mut me.inner).poll_frame(cx) {
                Poll::Ready(None) => me.ended = true,
                Poll::Ready(Some(next)) => me.ahead = Some(next),
                // It will be polled again after this frame; nothing is lost.
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.ahead.is_some() {
            // Whatever the frame read ahead holds is still to come.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records every write it is given; accepts at most `chunk` octets per write, and says
    /// "not now" every other call when `stall` is set.
    #[derive(Default, Clone)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        chunk: usize,
        stall: bool,
        stalled: bool,
        flushes: Arc<Mutex<usize>>,
    }

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.writes.lock().unwrap().clone()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stall && !self.stalled {
                self.stalled = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.stalled = false;
            let n = data.len().min(if self.chunk == 0 {
                usize::MAX
            } else {
                self.chunk
            });
            self.writes.lock().unwrap().push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.flushes.lock().unwrap() += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Flushes `g`; returns how many polls the flush took.
    async fn flush_counting_polls<T: AsyncWrite + Unpin>(g: &mut Gather<T>) -> usize {
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            Pin::new(&mut *g).poll_flush(cx)
        })
        .await
        .unwrap();
        polls
    }

    #[tokio::test]
    async fn writes_before_a_flush_leave_in_one_write() {
        let rec = Recorder::default();
        let mut g = Gather::new(rec.clone());
        g.write_all(b"headers").await.unwrap();
        let n = g
            .write_vectored(&[io::IoSlice::new(b"-da"), io::IoSlice::new(b"ta")])
            .await
            .unwrap();
        assert_eq!(n, 5, "a gathering write takes every slice");
        assert!(rec.writes().is_empty(), "nothing leaves before the flush");
        // The first poll of the flush yields once (and wakes itself); the second writes.
        let polls = flush_counting_polls(&mut g).await;
        assert_eq!(polls, 2);
        assert_eq!(rec.writes(), vec![b"headers-data".to_vec()]);
        assert_eq!(*rec.flushes.lock().unwrap(), 1);
        // An empty flush goes straight through, without a yield or a write.
        let polls = flush_counting_polls(&mut g).await;
        assert_eq!(polls, 1);
        assert_eq!(rec.writes().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_thread_runtime_a_flush_writes_at_once() {
        let rec = Recorder::default();
        let mut g = Gather::new(rec.clone());
        g.write_all(b"headers").await.unwrap();
        let polls = flush_counting_polls(&mut g).await;
        assert_eq!(
            polls, 1,
            "no yield: it could wake another worker for nothing"
        );
        assert_eq!(rec.writes(), vec![b"headers".to_vec()]);
    }

    #[tokio::test]
    async fn short_and_stalled_writes_lose_nothing() {
        let rec = Recorder {
            chunk: 3,
            stall: true,
            ..Recorder::default()
        };
        let mut g = Gather::new(rec.clone());
        g.write_all(b"0123456789").await.unwrap();
        g.flush().await.unwrap();
        g.write_all(b"abc").await.unwrap();
        g.shutdown().await.unwrap();
        assert_eq!(rec.writes().concat(), b"0123456789abc".to_vec());
        assert!(rec.writes().iter().all(|w| w.len() <= 3));
    }

    #[tokio::test]
    async fn a_large_buffer_starts_to_leave_before_the_flush() {
        let rec = Recorder::default();
        let mut g = Gather::new(rec.clone());
        let block = vec![7u8; HOLD_MAX];
        g.write_all(&block).await.unwrap();
        assert!(rec.writes().is_empty());
        g.write_all(b"x").await.unwrap();
        assert_eq!(
            rec.writes().concat().len(),
            HOLD_MAX,
            "the full buffer left first"
        );
        g.flush().await.unwrap();
        assert_eq!(rec.writes().concat().len(), HOLD_MAX + 1);
    }

    #[tokio::test]
    async fn a_write_that_makes_no_progress_is_an_error() {
        struct Zero;
        impl AsyncWrite for Zero {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(0))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut g = Gather::new(Zero);
        g.write_all(b"abc").await.unwrap();
        let err = g.flush().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }

    /// A body of the given frames; `None` stands for a poll that is not ready yet.
    struct Frames(std::collections::VecDeque<Option<&'static [u8]>>);

    impl Body for Frames {
        type Data = bytes::Bytes;
        type Error = io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, io::Error>>> {
            match self.0.pop_front() {
                None => Poll::Ready(None),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(Some(b)) => Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(b))))),
            }
        }
    }

    /// Polls once; returns the data of a ready frame, `Err(true)` at the end, `Err(false)`
    /// when not ready.
    fn poll_once<B: Body<Data = bytes::Bytes> + Unpin>(b: &mut B) -> Result<Vec<u8>, bool>
    where
        B::Error: std::fmt::Debug,
    {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match Pin::new(b).poll_frame(&mut cx) {
            Poll::Ready(Some(f)) => Ok(f.unwrap().into_data().unwrap().to_vec()),
            Poll::Ready(None) => Err(true),
            Poll::Pending => Err(false),
        }
    }

    #[test]
    fn prompt_says_the_body_ended_with_its_last_frame() {
        let mut b = Prompt::new(Frames([Some(&b"a"[..]), Some(b"b")].into_iter().collect()));
        assert!(!b.is_end_stream());
        assert_eq!(poll_once(&mut b), Ok(b"a".to_vec()));
        assert!(!b.is_end_stream(), "b is still to come");
        assert_eq!(poll_once(&mut b), Ok(b"b".to_vec()));
        assert!(
            b.is_end_stream(),
            "known with the last frame, not one poll later"
        );
        assert_eq!(poll_once(&mut b), Err(true));
        assert_eq!(
            poll_once(&mut b),
            Err(true),
            "polling after the end stays ended"
        );
    }

    #[test]
    fn prompt_loses_nothing_when_the_look_ahead_is_not_ready() {
        let mut b = Prompt::new(Frames(
            [Some(&b"a"[..]), None, Some(b"b"), None]
                .into_iter()
                .collect(),
        ));
        assert_eq!(poll_once(&mut b), Ok(b"a".to_vec()));
        assert!(!b.is_end_stream());
        assert_eq!(poll_once(&mut b), Ok(b"b".to_vec()));
        assert!(
            !b.is_end_stream(),
            "the look-ahead was not ready: the end is not known yet"
        );
        assert_eq!(poll_once(&mut b), Err(true));
        assert!(b.is_end_stream());
    }
}
