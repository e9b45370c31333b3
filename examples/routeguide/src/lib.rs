//! gRPC's RouteGuide over shmesh: the code generated from
//! `proto/route_guide.proto` by shmesh-build, and an implementation with
//! all four kinds of call, which the server binary and the tests run.

/// The `routeguide` package: messages, `route_guide_client`,
/// `route_guide_blocking_client`, `route_guide_server`, `route_guide_schema`.
pub mod routeguide {
    include!(concat!(env!("OUT_DIR"), "/routeguide.rs"));
}

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use routeguide::route_guide_server::RouteGuide;
use routeguide::{Feature, Point, Rectangle, RouteNote, RouteSummary};
use shmesh_protobuf::Request;
use shmesh_protobuf::server::{BidiStream, RequestStream, ResponseSink};
use shmesh_protobuf::shmesh::status::Status;

/// Where the server listens unless told otherwise.
pub const DEFAULT_ADDRESS: &str = "shm://@shmesh-routeguide";

/// The feature database: a 10 × 10 grid of named places, 0.1° apart,
/// from (40°, -75°).
pub fn features() -> Vec<Feature> {
    let mut features = Vec::new();
    for i in 0..10 {
        for j in 0..10 {
            let location = grid_point(i, j);
            features.push(Feature {
                name: format!("place {i}-{j}"),
                location: Some(location),
            });
        }
    }
    features
}

/// The point of the grid's row `i`, column `j`.
pub fn grid_point(i: i32, j: i32) -> Point {
    Point {
        latitude: 400_000_000 + i * 1_000_000,
        longitude: -750_000_000 + j * 1_000_000,
    }
}

/// Serves [`features`], and keeps the notes left at each point.
#[derive(Debug)]
pub struct RouteGuideService {
    features: Vec<Feature>,
    notes: Mutex<HashMap<(i32, i32), Vec<RouteNote>>>,
}

impl Default for RouteGuideService {
    fn default() -> Self {
        RouteGuideService {
            features: features(),
            notes: Mutex::default(),
        }
    }
}

impl RouteGuideService {
    fn feature_at(&self, point: &Point) -> Option<&Feature> {
        self.features
            .iter()
            .find(|f| f.location.as_ref() == Some(point))
    }
}

fn in_range(point: &Point, rect: &Rectangle) -> bool {
    let (lo, hi) = (rect.lo.unwrap_or_default(), rect.hi.unwrap_or_default());
    let (left, right) = (
        lo.longitude.min(hi.longitude),
        lo.longitude.max(hi.longitude),
    );
    let (bottom, top) = (lo.latitude.min(hi.latitude), lo.latitude.max(hi.latitude));
    (left..=right).contains(&point.longitude) && (bottom..=top).contains(&point.latitude)
}

/// Great-circle distance between two points, in meters (haversine).
pub fn distance(a: &Point, b: &Point) -> f64 {
    const COORD_FACTOR: f64 = 1e7;
    const EARTH_RADIUS_M: f64 = 6_371_000.0;
    let lat1 = (f64::from(a.latitude) / COORD_FACTOR).to_radians();
    let lat2 = (f64::from(b.latitude) / COORD_FACTOR).to_radians();
    let lon1 = (f64::from(a.longitude) / COORD_FACTOR).to_radians();
    let lon2 = (f64::from(b.longitude) / COORD_FACTOR).to_radians();
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().atan2((1.0 - h).sqrt())
}

impl RouteGuide for RouteGuideService {
    async fn get_feature(&self, request: Request<Point>) -> Result<Feature, Status> {
        let point = request.into_inner();
        Ok(self.feature_at(&point).cloned().unwrap_or(Feature {
            name: String::new(),
            location: Some(point),
        }))
    }

    async fn list_features(
        &self,
        request: Request<Rectangle>,
        mut responses: ResponseSink<Feature>,
    ) -> Result<(), Status> {
        let rect = request.into_inner();
        for feature in &self.features {
            if feature
                .location
                .as_ref()
                .is_some_and(|p| in_range(p, &rect))
            {
                responses.send(feature).await?;
            }
        }
        Ok(())
    }

    async fn record_route(
        &self,
        mut requests: RequestStream<Point>,
    ) -> Result<RouteSummary, Status> {
        let started = Instant::now();
        let mut summary = RouteSummary::default();
        let mut distance_m = 0.0;
        let mut last: Option<Point> = None;
        while let Some(point) = requests.message().await? {
            summary.point_count += 1;
            if self.feature_at(&point).is_some() {
                summary.feature_count += 1;
            }
            if let Some(last) = &last {
                distance_m += distance(last, &point);
            }
            last = Some(point);
        }
        // Saturating float-to-int casts: a route longer than i32::MAX
        // meters reads as that.
        summary.distance = distance_m as i32;
        summary.elapsed_time = i32::try_from(started.elapsed().as_secs()).unwrap_or(i32::MAX);
        Ok(summary)
    }

    async fn route_chat(&self, mut call: BidiStream<RouteNote, RouteNote>) -> Result<(), Status> {
        while let Some(note) = call.message().await? {
            let location = note.location.unwrap_or_default();
            let key = (location.latitude, location.longitude);
            let earlier = {
                let mut notes = self
                    .notes
                    .lock()
                    .map_err(|_| Status::internal("the notes' lock is poisoned"))?;
                let here = notes.entry(key).or_default();
                let earlier = here.clone();
                here.push(note);
                earlier
            };
            for note in &earlier {
                call.send(note).await?;
            }
        }
        Ok(())
    }
}
