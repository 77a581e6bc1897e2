//! ComfyUI's HTTP + WebSocket API against the real `sakuga serve` on free ports: the 400
//! bodies of invalid prompts, the WebSocket message order of an uncached and a cached run,
//! `/view` confinement, uploads, one engine behind both protocols, admission refusals as
//! 429 with `Retry-After`, and bearer-token auth.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

use sakuga::client::SakugaClient;
use sakuga_proto::v1;

mod support;
use support::{Spawned, http, spawn_server_full, wait_serving, watch_to_end};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A server with the demo models, its folders under a temp dir.
async fn server(serve: &[&str]) -> (tempfile::TempDir, Spawned) {
    let dir = tempfile::tempdir().unwrap();
    sakuga_models::demo::write_demo_models(&dir.path().join("models")).unwrap();
    let spawned = spawn_server_full(dir.path(), &[], serve);
    wait_serving(&spawned.url).await;
    (dir, spawned)
}

/// The README's text-to-image example, made small: 64x64, `steps` steps, `seed`.
fn txt2img(seed: u64, steps: u64) -> Json {
    let text = include_str!("../examples/anime_txt2img.json");
    let mut wf: Json = serde_json::from_str(text).unwrap();
    wf["5"]["inputs"]["width"] = json!(64);
    wf["5"]["inputs"]["height"] = json!(64);
    wf["3"]["inputs"]["steps"] = json!(steps);
    wf["3"]["inputs"]["seed"] = json!(seed);
    wf
}

async fn ws_connect(addr: &str, client_id: &str) -> Ws {
    let url = format!("ws://{addr}/ws?clientId={client_id}");
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

async fn next_message(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(120), ws.next())
        .await
        .expect("a WebSocket message within the deadline")
        .expect("the WebSocket stayed open")
        .unwrap()
}

/// The JSON messages about `prompt_id` up to its final `executing` with `node: null`
/// (`status` broadcasts left out).
async fn messages_until_done(ws: &mut Ws, prompt_id: &str) -> Vec<Json> {
    let mut seen = Vec::new();
    loop {
        let Message::Text(text) = next_message(ws).await else {
            continue;
        };
        let msg: Json = serde_json::from_str(&text).unwrap();
        if msg["type"] == "status" || msg["data"]["prompt_id"] != prompt_id {
            continue;
        }
        let done = msg["type"] == "executing" && msg["data"]["node"].is_null();
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

fn types(messages: &[Json]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect()
}

async fn post_prompt(addr: &str, body: Json) -> http::Response {
    http::post_json(addr, "/prompt", &body).await
}

#[tokio::test]
async fn invalid_prompts_get_comfyuis_400_bodies() {
    let (_dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;

    let mut missing = txt2img(1, 2);
    missing["3"]["inputs"]
        .as_object_mut()
        .unwrap()
        .remove("seed");
    let r = post_prompt(addr, json!({"prompt": missing})).await;
    assert_eq!(r.status, 400);
    let body = r.json();
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(body["error"]["message"], "Prompt outputs failed validation");
    assert_eq!(
        body["node_errors"]["3"],
        json!({
            "errors": [{"type": "required_input_missing", "message": "Required input is missing",
                        "details": "seed", "extra_info": {"input_name": "seed"}}],
            "dependent_outputs": ["9"],
            "class_type": "KSampler",
        })
    );

    let mut unknown = txt2img(1, 2);
    unknown["99"] = json!({"class_type": "NoSuchNode", "inputs": {}});
    let body = post_prompt(addr, json!({"prompt": unknown})).await.json();
    let error = &body["node_errors"]["99"]["errors"][0];
    assert_eq!(error["type"], "missing_node_type");
    assert_eq!(error["extra_info"]["class_type"], "NoSuchNode");
    assert_eq!(body["node_errors"]["99"]["class_type"], "NoSuchNode");

    let mut cycle = txt2img(1, 2);
    cycle["20"] = json!({"class_type": "ImageInvert", "inputs": {"image": ["21", 0]}});
    cycle["21"] = json!({"class_type": "ImageInvert", "inputs": {"image": ["20", 0]}});
    cycle["9"]["inputs"]["images"] = json!(["20", 0]);
    let r = post_prompt(addr, json!({"prompt": cycle})).await;
    assert_eq!(r.status, 400);
    let body = r.json();
    for id in ["20", "21"] {
        let error = &body["node_errors"][id]["errors"][0];
        assert_eq!(error["type"], "dependency_cycle", "{body}");
        assert_eq!(error["extra_info"]["cycle"], json!(["20", "21"]));
    }

    let mut range = txt2img(1, 2);
    range["3"]["inputs"]["steps"] = json!(0);
    let body = post_prompt(addr, json!({"prompt": range})).await.json();
    let error = &body["node_errors"]["3"]["errors"][0];
    assert_eq!(error["type"], "value_smaller_than_min");
    assert_eq!(error["details"], "steps");
    assert_eq!(error["extra_info"]["received_value"], 0);

    let r = post_prompt(addr, json!({"client_id": "x"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "no_prompt");
    let r = http::post_json(addr, "/api/prompt", &json!({"prompt": {}})).await;
    assert_eq!(r.status, 400, "the /api/ prefix serves the same routes");
    assert_eq!(r.json()["error"]["type"], "prompt_no_outputs");
}

#[tokio::test]
async fn websocket_messages_follow_comfyuis_order_uncached_then_cached() {
    let (_dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;
    let mut ws = ws_connect(addr, "order-test").await;
    let Message::Text(hello) = next_message(&mut ws).await else {
        panic!("the first message is status text");
    };
    let hello: Json = serde_json::from_str(&hello).unwrap();
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], "order-test");
    assert_eq!(hello["data"]["status"]["exec_info"]["queue_remaining"], 0);

    let prompt = txt2img(7, 3);
    let body = json!({"prompt": prompt, "client_id": "order-test", "extra_data": {"k": 1}});
    let r = post_prompt(addr, body.clone()).await;
    assert_eq!(r.status, 200);
    let accepted = r.json();
    let id = accepted["prompt_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["node_errors"], json!({}));
    assert!(accepted["number"].is_number());

    let first = messages_until_done(&mut ws, &id).await;
    let kinds = types(&first);
    assert_eq!(
        kinds[..2],
        ["execution_start", "execution_cached"],
        "{kinds:?}"
    );
    assert_eq!(first[1]["data"]["nodes"], json!([]));
    assert_eq!(kinds[kinds.len() - 2..], ["execution_success", "executing"]);
    let executing: Vec<&str> = first
        .iter()
        .filter(|m| m["type"] == "executing" && !m["data"]["node"].is_null())
        .map(|m| m["data"]["node"].as_str().unwrap())
        .collect();
    let mut sorted = executing.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["10", "3", "4", "5", "6", "7", "8", "9"]);
    // Each node's progress comes after its `executing`; the sampler reports every step.
    let mut current = None;
    for m in &first {
        match m["type"].as_str().unwrap() {
            "executing" => current = Some(m["data"]["node"].clone()),
            "progress" => assert_eq!(Some(m["data"]["node"].clone()), current, "{kinds:?}"),
            _ => {}
        }
    }
    let sampler: Vec<&Json> = first
        .iter()
        .filter(|m| m["type"] == "progress" && m["data"]["node"] == "3")
        .collect();
    assert_eq!(sampler.len(), 3, "{kinds:?}");
    assert_eq!(
        sampler[2]["data"],
        json!({"value": 3, "max": 3, "prompt_id": id, "node": "3"})
    );
    let executed = first.iter().find(|m| m["type"] == "executed").unwrap();
    assert_eq!(executed["data"]["node"], "9");
    let image = &executed["data"]["output"]["images"][0];
    assert_eq!(image["type"], "output");

    // The same prompt again: everything but the save node comes from the output cache.
    let r = post_prompt(addr, body).await;
    let again = r.json()["prompt_id"].as_str().unwrap().to_owned();
    let second = messages_until_done(&mut ws, &again).await;
    assert_eq!(
        types(&second),
        [
            "execution_start",
            "execution_cached",
            "executing",
            "executed",
            "execution_success",
            "executing"
        ]
    );
    let mut cached: Vec<String> =
        serde_json::from_value(second[1]["data"]["nodes"].clone()).unwrap();
    cached.sort_unstable();
    assert_eq!(cached, ["10", "3", "4", "5", "6", "7", "8"]);
    assert_eq!(second[2]["data"]["node"], "9");

    // The output through /view, and the history entry that names it.
    let query = format!(
        "/view?filename={}&subfolder={}&type=output",
        image["filename"].as_str().unwrap(),
        image["subfolder"].as_str().unwrap()
    );
    let view = http::get(addr, &query).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.header("content-type"), Some("image/png"));
    assert_eq!(&view.body[..4], b"\x89PNG");
    let history = http::get(addr, &format!("/history/{id}")).await.json();
    let entry = &history[&id];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["outputs"]["9"]["images"][0], *image);
    assert_eq!(entry["prompt"][1], id.as_str());
    assert_eq!(
        entry["prompt"][3],
        json!({"k": 1, "client_id": "order-test"})
    );
    assert_eq!(entry["prompt"][4], json!(["9"]));
    let all = http::get(addr, "/history?max_items=10").await.json();
    assert!(all.get(&id).is_some() && all.get(&again).is_some());
    assert_eq!(
        http::get(addr, "/prompt").await.json()["exec_info"]["queue_remaining"],
        0
    );
}

#[tokio::test]
async fn view_and_upload_stay_inside_their_folders() {
    let (dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("sub").join("a.png"), b"\x89PNG fake").unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"secret").unwrap();
    std::os::unix::fs::symlink(&secret, out.join("link.png")).unwrap();
    std::os::unix::fs::symlink(dir.path(), out.join("up")).unwrap();

    let ok = http::get(addr, "/view?filename=a.png&subfolder=sub&type=output").await;
    assert_eq!((ok.status, ok.body.as_slice()), (200, &b"\x89PNG fake"[..]));
    let attempts = [
        ("/view?filename=../secret.txt&type=output", 400),
        ("/view?filename=%2Fetc%2Fpasswd", 400),
        ("/view?filename=secret.txt&subfolder=..&type=output", 403),
        ("/view?filename=passwd&subfolder=%2Fetc", 403),
        ("/view?filename=link.png&type=output", 403),
        ("/view?filename=secret.txt&subfolder=up&type=output", 403),
        ("/view?filename=a.png&subfolder=sub&type=models", 400),
        ("/view?filename=nothing.png&type=output", 404),
    ];
    for (query, status) in attempts {
        let r = http::get(addr, query).await;
        assert_eq!(
            r.status,
            status,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.body.starts_with(b"secret"), "{query} leaked the file");
    }

    let png = b"\x89PNG upload one";
    let r = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "refs")],
        ("image", "pic.png", png),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"name": "pic.png", "subfolder": "refs", "type": "input"})
    );
    let same = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "refs")],
        ("image", "pic.png", png),
    )
    .await;
    assert_eq!(
        same.json()["name"],
        "pic.png",
        "an identical upload is not stored twice"
    );
    let other = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "refs")],
        ("image", "pic.png", b"other"),
    )
    .await;
    assert_eq!(other.json()["name"], "pic (1).png");
    let over = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "refs"), ("overwrite", "true")],
        ("image", "pic.png", b"third"),
    )
    .await;
    assert_eq!(over.json()["name"], "pic.png");
    let back = http::get(addr, "/view?filename=pic.png&subfolder=refs&type=input").await;
    assert_eq!(back.body, b"third");
    let escape = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "../..")],
        ("image", "x.png", b"x"),
    )
    .await;
    assert_eq!(escape.status, 400);
    let through_link = http::post_multipart(
        addr,
        "/upload/image",
        &[("subfolder", "up"), ("type", "output")],
        ("image", "x.png", b"x"),
    )
    .await;
    assert_eq!(through_link.status, 400);
    assert!(!dir.path().join("x.png").exists());
    let bad_name =
        http::post_multipart(addr, "/upload/image", &[], ("image", "../x.png", b"x")).await;
    assert_eq!(bad_name.status, 400);
}

#[tokio::test]
async fn one_engine_serves_both_protocols() {
    let (_dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;
    let mut grpc = SakugaClient::connect(&server.url, None).await.unwrap();

    // Submitted over HTTP, watched to success over gRPC under the same id.
    let r = post_prompt(addr, json!({"prompt": txt2img(11, 2)})).await;
    let id = r.json()["prompt_id"].as_str().unwrap().to_owned();
    let state = watch_to_end(&mut grpc, &id).await;
    assert_eq!(state, v1::JobState::Succeeded as i32);

    // Submitted over gRPC, seen to success through /history, listed by /queue meanwhile.
    let submit = v1::SubmitRequest {
        workflow: Some(v1::submit_request::Workflow::WorkflowJson(
            txt2img(12, 2).to_string(),
        )),
        ..Default::default()
    };
    let job = grpc
        .render
        .submit(submit)
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let entry = loop {
        let history = http::get(addr, &format!("/api/history/{job}")).await.json();
        if let Some(entry) = history.get(&job) {
            break entry.clone();
        }
        let queue = http::get(addr, "/queue").await.json();
        let listed = queue["queue_running"]
            .as_array()
            .unwrap()
            .iter()
            .chain(queue["queue_pending"].as_array().unwrap())
            .any(|item| item[1] == job.as_str());
        let history = http::get(addr, &format!("/history/{job}")).await.json();
        assert!(
            listed || history.get(&job).is_some(),
            "job {job} is neither queued nor done"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {job} did not finish"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(entry["status"]["status_str"], "success");
    assert!(entry["outputs"]["9"]["images"][0]["filename"].is_string());

    // The unified jobs API the frontend reads: both jobs, newest first, with outputs.
    let jobs = http::get(addr, "/api/jobs?status=completed,failed&limit=10&offset=0")
        .await
        .json();
    let ids: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [job.as_str(), id.as_str()]);
    assert_eq!(jobs["jobs"][0]["status"], "completed");
    assert_eq!(jobs["jobs"][0]["preview_output"]["nodeId"], "9");
    assert_eq!(
        jobs["pagination"],
        json!({"offset": 0, "limit": 10, "total": 2, "has_more": false})
    );
    let pending = http::get(addr, "/jobs?status=pending,in_progress")
        .await
        .json();
    assert_eq!(pending["jobs"], json!([]));
    let detail = http::get(addr, &format!("/jobs/{id}")).await.json();
    assert_eq!(detail["outputs"]["9"]["images"][0]["type"], "output");
    assert_eq!(http::get(addr, "/jobs/nope").await.status, 404);
}

#[tokio::test]
async fn a_burst_past_the_queue_cap_is_refused_with_429_and_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tunables.toml"),
        "[admission.queue_caps]\nanimation = 1\nsingle_image = 1\nbatch = 1\n",
    )
    .unwrap();
    let tunables = dir.path().join("tunables.toml");
    let (_dir, server) = server(&["--tunables", tunables.to_str().unwrap()]).await;
    let addr = server.comfy_addr.clone();
    let posts: Vec<_> = (0..12)
        .map(|i| {
            let addr = addr.clone();
            tokio::spawn(async move {
                post_prompt(&addr, json!({"prompt": txt2img(100 + i, 12)})).await
            })
        })
        .collect();
    let mut refused = 0;
    for post in posts {
        let r = post.await.unwrap();
        match r.status {
            200 => {}
            429 => {
                refused += 1;
                let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!(after >= 1);
                assert_eq!(r.json()["error"]["type"], "queue_full");
            }
            other => panic!(
                "unexpected status {other}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    assert!(
        refused >= 1,
        "12 prompts against a queue of 1 must see refusals"
    );
}

#[tokio::test]
async fn the_bearer_token_guards_the_api() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
    let token = dir.path().join("token");
    let (_dir, server) = server(&["--auth-token-file", token.to_str().unwrap()]).await;
    let addr = &server.comfy_addr;
    let r = http::get(addr, "/system_stats").await;
    assert_eq!(r.status, 401);
    let r = http::request(
        addr,
        "GET",
        "/system_stats",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http::request(
        addr,
        "GET",
        "/api/system_stats",
        &[("Authorization", "Bearer s3cret")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["devices"][0]["name"].is_string());
    let r = http::request(
        addr,
        "POST",
        "/prompt",
        &[
            ("Host", "127.0.0.1:8188"),
            ("Origin", "https://evil.example"),
            ("Authorization", "Bearer s3cret"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(
        r.status, 403,
        "a foreign origin may not post to a loopback server"
    );
}

#[tokio::test]
async fn catalogue_models_and_settings_endpoints_answer_in_comfyuis_shapes() {
    let (_dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;
    let info = http::get(addr, "/object_info/KSampler").await.json();
    let ks = &info["KSampler"];
    assert_eq!(
        ks["input"]["required"]["steps"],
        json!(["INT", {"default": 20, "min": 1, "max": 10000, "step": 1}])
    );
    assert!(
        ks["input"]["required"]["sampler_name"][0]
            .as_array()
            .unwrap()
            .contains(&json!("euler"))
    );
    // ComfyUI's seeds go to 2^64 - 1; the UI randomises within the max it is shown.
    assert_eq!(
        ks["input"]["required"]["seed"][1]["max"],
        json!(18_446_744_073_709_551_615_u64)
    );
    assert_eq!(ks["output"], json!(["LATENT"]));
    assert_eq!(ks["output_node"], false);
    assert_eq!(http::get(addr, "/object_info/Nope").await.json(), json!({}));
    let all = http::get(addr, "/object_info").await.json();
    assert_eq!(all["SaveImage"]["output_node"], true);
    let ckpts = http::get(addr, "/models/checkpoints").await.json();
    assert!(
        ckpts
            .as_array()
            .unwrap()
            .contains(&json!("sakuga-demo-sd15.safetensors"))
    );
    assert_eq!(http::get(addr, "/models/../etc").await.status, 404);
    assert!(
        http::get(addr, "/models")
            .await
            .json()
            .as_array()
            .unwrap()
            .contains(&json!("loras"))
    );
    assert!(http::get(addr, "/embeddings").await.json().is_array());
    assert_eq!(http::get(addr, "/extensions").await.json(), json!([]));
    assert!(http::get(addr, "/features").await.json()["max_upload_size"].is_number());

    let r = http::post_json(addr, "/settings/Comfy.Theme", &json!("dark")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        http::get(addr, "/settings").await.json()["Comfy.Theme"],
        "dark"
    );
    assert_eq!(
        http::get(addr, "/settings/Comfy.Theme").await.json(),
        "dark"
    );
    let r = http::request(
        addr,
        "POST",
        "/userdata/workflows%2Fa.json?overwrite=false",
        &[],
        b"{\"x\":1}",
    )
    .await;
    assert_eq!(r.status, 200);
    let again = http::request(
        addr,
        "POST",
        "/userdata/workflows%2Fa.json?overwrite=false",
        &[],
        b"{}",
    )
    .await;
    assert_eq!(again.status, 409);
    let list = http::get(addr, "/userdata?dir=workflows&recurse=true")
        .await
        .json();
    assert_eq!(list, json!(["a.json"]));
    assert_eq!(
        http::get(addr, "/userdata/workflows%2Fa.json").await.body,
        b"{\"x\":1}"
    );
    assert_eq!(
        http::get(addr, "/userdata/..%2F..%2Fdata").await.status,
        400
    );
    assert_eq!(http::get(addr, "/users").await.json()["storage"], "server");
}

/// `PreviewAny` shows its text on the node, as ComfyUI's `executed` message carries it, and
/// passes it on through its STRING output.
#[tokio::test]
async fn preview_any_sends_its_text_in_executed() {
    let (_dir, server) = server(&[]).await;
    let addr = &server.comfy_addr;
    let mut ws = ws_connect(addr, "text-test").await;
    let _status = next_message(&mut ws).await;
    let prompt = json!({
        "1": {"class_type": "PrimitiveFloat", "inputs": {"value": 2.5}},
        "2": {"class_type": "ComfyMathExpression", "inputs": {"expression": "a * 4", "values.a": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    });
    let r = post_prompt(addr, json!({"prompt": prompt, "client_id": "text-test"})).await;
    assert_eq!(r.status, 200, "{}", r.json());
    let id = r.json()["prompt_id"].as_str().unwrap().to_owned();
    let messages = messages_until_done(&mut ws, &id).await;
    let shown = |node: &str| {
        messages
            .iter()
            .find(|m| m["type"] == "executed" && m["data"]["node"] == node)
            .map(|m| m["data"]["output"].clone())
    };
    assert_eq!(shown("3"), Some(json!({"text": ["10"]})), "{messages:?}");
    assert_eq!(shown("4"), Some(json!({"text": ["10"]})), "{messages:?}");
}
