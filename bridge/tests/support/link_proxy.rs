//! A TCP proxy a test puts on the link from one node to another, to cut
//! it: while cut, no byte passes either way and new connections hang, as
//! in a real partition (packets vanish; nothing is refused or reset).
//! Healing closes the connections held during the cut; new ones pass.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct LinkProxy {
    /// Where the node that uses this link connects.
    pub port: u16,
    cut: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// Forwards `127.0.0.1:<port>` to `127.0.0.1:<target_port>`.
    pub async fn start(target_port: u16) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, watched) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(forward(inbound, target_port, watched.clone()));
            }
        });
        LinkProxy {
            port,
            cut,
            accepting,
        }
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for LinkProxy {
    /// The forwarding tasks end with the sender (their `wait_for` fails).
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies both ways until either side closes or the link is cut; a cut
/// connection is held open (silent) until the cut heals, then closed.
async fn forward(mut inbound: TcpStream, target_port: u16, mut cut: watch::Receiver<bool>) {
    let is_cut = *cut.borrow();
    if !is_cut {
        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
            return;
        };
        let was_cut = tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
            cut = async { cut.wait_for(|cut| *cut).await.is_ok() } => cut,
        };
        if !was_cut {
            return;
        }
    }
    let _healed = cut.wait_for(|cut| !*cut).await.is_ok();
}
