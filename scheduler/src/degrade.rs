//! Degrading an animation preview in steps so it can keep its target FPS (DESIGN.md
//! section 7): when runs of the same workflow have shown that rendering takes longer than
//! the clip plays, the workflow is rewritten before it is queued, one step at a time in a
//! fixed order, until the nominal speed-up covers the shortfall:
//!
//! 1. interpolation x2: half the key frames, twice the `FrameInterpolate` multiplier (the
//!    clip keeps its length and frame count);
//! 2. fewer sampler steps: half of them (at least one);
//! 3. lower preview resolution: three quarters of the width and height of the source
//!    (`EmptyLatentImage`, `EmptyImage`), kept on the 8-pixel grid.
//!
//! Which node plays which part is read off its schema's roles ([`DegradeKnob`], the
//! stream node), never off its class name.
//!
//! Only what the workflow has can be degraded; whatever is still short shows later as late
//! or dropped frames. Each step taken is listed so the job's events can say so.

use serde_json::{Map, Value as Json};

use sakuga_nodes::{DegradeKnob, NodeRegistry, NodeRoles};
/// The smallest preview side the resolution step goes down to.
const MIN_SIDE: i64 = 64;

/// What the stream of a workflow asks for: its target FPS and how many frames it plays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamShape {
    pub target_fps: f64,
    pub frames: u64,
}

impl StreamShape {
    /// Seconds the clip plays at its target FPS.
    pub fn playback_s(&self) -> f64 {
        self.frames as f64 / self.target_fps
    }
}

/// The rewritten workflow and a line per step taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Degraded {
    pub workflow: Json,
    pub steps: Vec<String>,
    /// The nominal speed-up of all steps together.
    pub speedup: f64,
}

/// Ids of the nodes whose roles match, in id order.
fn nodes_of(
    workflow: &Map<String, Json>,
    registry: &NodeRegistry,
    wanted: impl Fn(&NodeRoles) -> bool,
) -> Vec<String> {
    let mut ids: Vec<String> = workflow
        .iter()
        .filter(|(_, node)| {
            node.get("class_type")
                .and_then(Json::as_str)
                .and_then(|c| registry.get(c))
                .is_some_and(|n| wanted(&n.schema().roles))
        })
        .map(|(id, _)| id.clone())
        .collect();
    ids.sort_unstable();
    ids
}

fn knob(knob: DegradeKnob) -> impl Fn(&NodeRoles) -> bool {
    move |roles| roles.degrade == Some(knob)
}

fn literal_i64(workflow: &Map<String, Json>, id: &str, input: &str) -> Option<i64> {
    let value = workflow.get(id)?.get("inputs")?.get(input)?;
    value
        .as_i64()
        .or_else(|| value.as_f64().map(|f| f as i64))
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

fn literal_f64(workflow: &Map<String, Json>, id: &str, input: &str) -> Option<f64> {
    let value = workflow.get(id)?.get("inputs")?.get(input)?;
    value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

fn set(workflow: &mut Map<String, Json>, id: &str, input: &str, value: i64) {
    if let Some(inputs) = workflow
        .get_mut(id)
        .and_then(|n| n.get_mut("inputs"))
        .and_then(Json::as_object_mut)
    {
        inputs.insert(input.to_owned(), Json::from(value));
    }
}

/// The stream a workflow plays: the first `StreamFrames` node's FPS, and the frames that
/// reach it (key frames, times the interpolation multiplier between them). `None` when it
/// streams nothing or its sizes are links rather than literals.
pub fn stream_shape(workflow: &Json, registry: &NodeRegistry) -> Option<StreamShape> {
    let nodes = workflow.as_object()?;
    let streams = nodes_of(nodes, registry, |roles| roles.streams);
    let stream = streams.first()?;
    let target_fps = literal_f64(nodes, stream, "fps").unwrap_or(24.0);
    let key_frames = nodes_of(nodes, registry, knob(DegradeKnob::KeyFrames))
        .iter()
        .filter_map(|id| literal_i64(nodes, id, "batch_size"))
        .max()?
        .max(1) as u64;
    let multiplier = nodes_of(nodes, registry, knob(DegradeKnob::InterpolationMultiplier))
        .iter()
        .filter_map(|id| literal_i64(nodes, id, "multiplier"))
        .product::<i64>()
        .max(1) as u64;
    (target_fps > 0.0).then_some(StreamShape {
        target_fps,
        frames: (key_frames - 1) * multiplier + 1,
    })
}

/// One step of degrading: rewrites the nodes, returning its speed-up and what it did.
type DegradeStep<'a> = dyn Fn(&mut Map<String, Json>) -> Option<(f64, String)> + 'a;

/// Degrades `workflow` until the nominal speed-up reaches `needed` (expected render time
/// over playback time) or no step is left; `None` when no step applies or none is needed.
pub fn degrade(workflow: &Json, needed: f64, registry: &NodeRegistry) -> Option<Degraded> {
    // NaN (an unknown render time) degrades nothing either.
    if needed.is_nan() || needed <= 1.0 {
        return None;
    }
    let mut nodes = workflow.as_object()?.clone();
    let mut steps = Vec::new();
    let mut speedup = 1.0;
    let sources = nodes_of(&nodes, registry, knob(DegradeKnob::KeyFrames));
    let order: [&DegradeStep<'_>; 3] = [
        &|nodes| interpolate_more(nodes, registry, &sources),
        &|nodes| fewer_steps(nodes, registry),
        &|nodes| lower_resolution(nodes, &sources),
    ];
    for step in order {
        if speedup >= needed {
            break;
        }
        if let Some((gain, note)) = step(&mut nodes) {
            speedup *= gain;
            steps.push(note);
        }
    }
    (!steps.is_empty()).then(|| Degraded {
        workflow: Json::Object(nodes),
        steps,
        speedup,
    })
}

/// Step 1: half the key frames, twice the interpolation multiplier.
fn interpolate_more(
    nodes: &mut Map<String, Json>,
    registry: &NodeRegistry,
    sources: &[String],
) -> Option<(f64, String)> {
    let interpolators = nodes_of(nodes, registry, knob(DegradeKnob::InterpolationMultiplier));
    let interpolate = interpolators.first()?;
    let multiplier = literal_i64(nodes, interpolate, "multiplier").unwrap_or(2);
    let key_frames = sources
        .iter()
        .filter_map(|id| literal_i64(nodes, id, "batch_size"))
        .max()?;
    if key_frames < 3 || multiplier * 2 > 16 {
        return None;
    }
    let fewer = key_frames / 2 + 1;
    for id in sources {
        if literal_i64(nodes, id, "batch_size") == Some(key_frames) {
            set(nodes, id, "batch_size", fewer);
        }
    }
    set(nodes, interpolate, "multiplier", multiplier * 2);
    let note = format!(
        "interpolation x2: {key_frames} -> {fewer} key frames, multiplier {multiplier} -> {}",
        multiplier * 2
    );
    Some((key_frames as f64 / fewer as f64, note))
}

/// Step 2: half the sampler steps (at least one).
fn fewer_steps(nodes: &mut Map<String, Json>, registry: &NodeRegistry) -> Option<(f64, String)> {
    let mut changed = Vec::new();
    let mut gain: f64 = 1.0;
    for id in &nodes_of(nodes, registry, knob(DegradeKnob::Steps)) {
        let Some(steps_now) = literal_i64(nodes, id, "steps") else {
            continue;
        };
        if steps_now < 2 {
            continue;
        }
        let fewer = (steps_now + 1) / 2;
        set(nodes, id, "steps", fewer);
        // KSamplerAdvanced counts its window in the same steps.
        for bound in ["start_at_step", "end_at_step"] {
            if let Some(at) = literal_i64(nodes, id, bound)
                && at < 10_000
            {
                set(nodes, id, bound, (at + 1) / 2);
            }
        }
        gain = gain.max(steps_now as f64 / fewer as f64);
        changed.push(format!("{steps_now} -> {fewer}"));
    }
    (!changed.is_empty()).then(|| (gain, format!("fewer steps: {}", changed.join(", "))))
}

/// Step 3: three quarters of the source's width and height, on the 8-pixel grid.
fn lower_resolution(nodes: &mut Map<String, Json>, sources: &[String]) -> Option<(f64, String)> {
    let mut changed = Vec::new();
    let mut gain: f64 = 1.0;
    for id in sources {
        let (Some(w), Some(h)) = (
            literal_i64(nodes, id, "width"),
            literal_i64(nodes, id, "height"),
        ) else {
            continue;
        };
        let shrink = |side: i64| ((side * 3 / 4) / 8 * 8).max(MIN_SIDE).min(side);
        let (w2, h2) = (shrink(w), shrink(h));
        if (w2, h2) == (w, h) {
            continue;
        }
        set(nodes, id, "width", w2);
        set(nodes, id, "height", h2);
        gain = gain.max((w * h) as f64 / (w2 * h2) as f64);
        changed.push(format!("{w}x{h} -> {w2}x{h2}"));
    }
    (!changed.is_empty()).then(|| {
        let note = format!("lower preview resolution: {}", changed.join(", "));
        (gain, note)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry() -> NodeRegistry {
        NodeRegistry::with_builtins()
    }

    fn stream_shape(workflow: &Json) -> Option<StreamShape> {
        super::stream_shape(workflow, &registry())
    }

    fn degrade(workflow: &Json, needed: f64) -> Option<Degraded> {
        super::degrade(workflow, needed, &registry())
    }

    fn preview() -> Json {
        json!({
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 9}},
            "5": {"class_type": "KSampler", "inputs": {"steps": 8, "latent_image": ["4", 0]}},
            "10": {"class_type": "FrameInterpolate", "inputs": {"images": ["5", 0], "multiplier": 2}},
            "11": {"class_type": "StreamFrames", "inputs": {"images": ["10", 0], "fps": 24.0}},
        })
    }

    #[test]
    fn the_stream_shape_counts_interpolated_frames() {
        let shape = stream_shape(&preview()).unwrap();
        assert_eq!(
            shape.frames, 17,
            "8 intervals of 2, plus the last key frame"
        );
        assert!((shape.playback_s() - 17.0 / 24.0).abs() < 1e-12);
        assert_eq!(
            stream_shape(&json!({"1": {"class_type": "EmptyImage", "inputs": {}}})),
            None
        );
    }

    #[test]
    fn steps_are_taken_in_order_until_the_shortfall_is_covered() {
        assert_eq!(degrade(&preview(), 0.8), None, "fast enough already");
        let one = degrade(&preview(), 1.5).unwrap();
        assert_eq!(one.steps.len(), 1);
        assert!(one.steps[0].starts_with("interpolation x2: 9 -> 5 key frames, multiplier 2 -> 4"));
        assert_eq!(
            stream_shape(&one.workflow).unwrap().frames,
            17,
            "same clip length"
        );
        assert_eq!(one.workflow["5"]["inputs"]["steps"], 8);

        let all = degrade(&preview(), 100.0).unwrap();
        assert_eq!(
            all.steps.len(),
            2,
            "64x64 is the floor already: {:?}",
            all.steps
        );
        assert_eq!(all.workflow["5"]["inputs"]["steps"], 4);
        assert_eq!(all.workflow["4"]["inputs"]["width"], 64);
        assert!(all.steps[1].starts_with("fewer steps: 8 -> 4"));
        let bigger = {
            let mut w = preview();
            w["4"]["inputs"]["width"] = json!(256);
            w["4"]["inputs"]["height"] = json!(128);
            w
        };
        let all = degrade(&bigger, 100.0).unwrap();
        assert_eq!(all.steps[2], "lower preview resolution: 256x128 -> 192x96");
        assert!(all.speedup > 1.8 * 2.0 * 1.7, "{}", all.speedup);
    }

    #[test]
    fn a_workflow_with_nothing_to_degrade_is_left_alone() {
        let plain = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
            "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": 24.0}},
        });
        assert_eq!(degrade(&plain, 10.0), None);
    }
}
