//! A CRL distribution point for the tests: a plain HTTP/1.1 server on 127.0.0.1:0 that
//! answers every GET with what the test put there (a CRL, an error status, or a hang-up),
//! counts the requests, and can be shut down for good (the port then refuses
//! connections). Written by hand on purpose: the broker's client must work against a
//! server it does not share code with.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::WAIT;

/// What the server answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status and an empty body.
    Status(u16),
    /// Close the connection without answering.
    HangUp,
}

/// The running server; stopped when dropped.
pub struct CrlServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    /// Requests answered so far (each fetch of the broker is one).
    served: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CrlServer {
    pub async fn start(answer: Answer) -> CrlServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answer = Arc::new(Mutex::new(answer));
        let (tx, served) = watch::channel(0u64);
        let shared = answer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let answer = shared.lock().expect("answer").clone();
                // The request head, bounded; its content does not matter here.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                match answer {
                    Answer::Body(body) => {
                        let headers = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = tcp.write_all(headers.as_bytes()).await;
                        let _ = tcp.write_all(&body).await;
                    }
                    Answer::Status(code) => {
                        let headers = format!(
                            "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        let _ = tcp.write_all(headers.as_bytes()).await;
                    }
                    Answer::HangUp => {}
                }
                let _ = tcp.shutdown().await;
                drop(tcp);
                tx.send_modify(|n| *n += 1);
            }
        });
        CrlServer {
            addr,
            answer,
            served,
            task,
        }
    }

    /// The URL of the CRL.
    pub fn url(&self) -> String {
        format!("http://{}/fleet.crl", self.addr)
    }

    /// Changes what the next requests get.
    pub fn set(&self, answer: Answer) {
        *self.answer.lock().expect("answer") = answer;
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        *self.served.borrow()
    }

    /// Waits (bounded) until `n` requests in all were answered.
    pub async fn wait_served(&mut self, n: u64) {
        let reached = tokio::time::timeout(WAIT, self.served.wait_for(|s| *s >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            reached,
            "the CRL server answered {} requests, expected {n}",
            self.served()
        );
    }

    /// Stops listening: the port refuses connections from now on.
    pub async fn shut_down(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for CrlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
