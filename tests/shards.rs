//! Shard-aware clients: `shards` tells the shard count, the routing function and each shard's
//! own port; a client that sends each name to its owner's port crosses no thread, and mixes
//! freely with ordinary clients on the same names.

mod common;

use std::net::TcpListener;

use glockd::client::{Client, ShardedClient};
use glockd::{Config, Listeners};

fn server_with_shard_ports(shards: u16) -> glockd::ServerHandle {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let config = Config {
        shards: Some(shards),
        pin: false,
        ..Config::default()
    };
    let listeners = Listeners {
        tcp: Some(bind()),
        shard_ports: (0..shards).map(|_| bind()).collect(),
        ..Listeners::default()
    };
    glockd::start_with_listeners(config, listeners).expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_names_the_count_the_routing_and_the_ports() {
    let server = server_with_shard_ports(4);
    let addr = server.tcp_addr().expect("tcp");
    let mut client = Client::connect(addr).await.expect("connect");
    let ports: Vec<String> = server
        .shard_addrs()
        .iter()
        .map(|a| a.port().to_string())
        .collect();
    assert_eq!(
        String::from_utf8(client.command(b"shards").await.expect("shards")).expect("text"),
        format!("1 4 fnv1a64 {}", ports.join(" "))
    );
    // Without shard ports: the count and the function, no ports.
    let plain = common::TestServer::start(2);
    let mut client = plain.client().await;
    assert_eq!(
        client.command(b"shards").await.expect("shards"),
        b"1 2 fnv1a64"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_aware_client_crosses_no_thread_and_excludes_ordinary_ones() {
    let server = server_with_shard_ports(4);
    let addr = server.tcp_addr().expect("tcp");
    let mut aware = ShardedClient::connect("127.0.0.1", addr.port())
        .await
        .expect("connect");
    assert_eq!(aware.connections(), 4);
    let names: Vec<String> = (0..200).map(|i| format!("aware-{i}")).collect();
    let before = server.local_and_remote_commands();
    for name in &names {
        assert!(aware.get(name).await.expect("g"));
    }
    let after = server.local_and_remote_commands();
    assert_eq!(after.1, before.1, "no command crossed a thread");
    assert_eq!(after.0 - before.0, 200);

    // An ordinary client on the same names is refused them, and sees them held.
    let mut ordinary = Client::connect(addr).await.expect("connect");
    for name in &names {
        assert!(!ordinary.get(name).await.expect("g"));
        assert!(ordinary.inspect(name).await.expect("i"));
    }
    // Releasing through the shard-aware client frees them for the ordinary one.
    for name in &names[..100] {
        assert!(aware.release(name).await.expect("r"));
        assert!(ordinary.get(name).await.expect("g"));
        assert!(!aware.get(name).await.expect("g"));
    }
    // Dropping the shard-aware client releases every lock it still held, on every shard.
    drop(aware);
    for name in &names[100..] {
        let mut freed = false;
        for _ in 0..200 {
            if !ordinary.inspect(name).await.expect("i") {
                freed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(freed, "{name} still held after its holder left");
    }
    assert_eq!(server.stats().locks, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_aware_client_falls_back_to_one_connection() {
    // A server without shard ports.
    let plain = common::TestServer::start(4);
    let addr = plain.addr;
    let mut client = ShardedClient::connect("127.0.0.1", addr.port())
        .await
        .expect("connect");
    assert_eq!(client.connections(), 1);
    assert!(client.get("x").await.expect("g"));
    assert!(client.inspect("x").await.expect("i"));

    // A server that answers nothing to a command it does not know, as the original did.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let answering = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        // The first connection asks `shards` and gets nothing; the second is used.
        let (_first, _) = silent.accept().expect("accept");
        let (second, _) = silent.accept().expect("accept");
        let mut reader = BufReader::new(second.try_clone().expect("clone"));
        let mut writer = second;
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if line.starts_with("g ") {
                let _ = writer.write_all(b"1 Lock Get Success\n");
            }
            line.clear();
        }
    });
    let mut client = ShardedClient::connect("127.0.0.1", silent_addr.port())
        .await
        .expect("connect");
    assert_eq!(client.connections(), 1);
    assert!(client.get("y").await.expect("g"));
    drop(client);
    answering.join().expect("fake server");
}
