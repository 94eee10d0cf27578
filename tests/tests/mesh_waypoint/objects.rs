//! The routing and policy objects the waypoint test applies (Istio and Gateway API YAML, as
//! users write them).

pub const GATEWAY: &str = "
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: waypoint, namespace: mesh, labels: {istio.io/waypoint-for: all}}
  spec:
    gatewayClassName: mesh-waypoint
    listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

pub const DESTINATION_RULE: &str = "
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: reviews, namespace: mesh}
  spec:
    host: reviews
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
      - {name: v3, labels: {version: v3}}
      - {name: retry, labels: {pool: retry}}
      - name: guarded
        labels: {version: v1}
        trafficPolicy:
          connectionPool:
            tcp: {maxConnections: 1}
            http: {http1MaxPendingRequests: 1, http2MaxRequests: 1}
";

/// All of `reviews` to v1 (the tutorial's first step).
pub const ALL_TO_V1: &str = "
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: reviews, namespace: mesh}
  spec:
    hosts: [reviews]
    http:
      - route: [{destination: {host: reviews, subset: v1}}]
";

/// Every feature the test asserts, one rule each, then the 80/20 canary.
pub const FEATURES: &str = "
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: reviews, namespace: mesh}
  spec:
    hosts: [reviews]
    http:
      - name: jason
        match: [{headers: {end-user: {exact: jason}}}]
        route: [{destination: {host: reviews, subset: v3}}]
      - name: delay
        match: [{uri: {prefix: /fault-delay}}]
        fault: {delay: {fixedDelay: 1s, percentage: {value: 100}}}
        route: [{destination: {host: reviews, subset: v1}}]
      - name: abort
        match: [{uri: {prefix: /fault-abort}}]
        fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
        route: [{destination: {host: reviews, subset: v1}}]
      - name: timeout
        match: [{uri: {prefix: /timeout}}]
        rewrite: {uri: /delay/2000}
        timeout: 0.3s
        route: [{destination: {host: reviews, subset: v1}}]
      - name: retry
        match: [{uri: {prefix: /retry}}]
        retries: {attempts: 3, retryOn: 5xx}
        route: [{destination: {host: reviews, subset: retry}}]
      - name: noretry
        match: [{uri: {prefix: /noretry}}]
        retries: {attempts: 0}
        route: [{destination: {host: reviews, subset: retry}}]
      - name: mirror
        match: [{uri: {prefix: /mirror}}]
        route: [{destination: {host: reviews, subset: v1}}]
        mirror: {host: reviews, subset: v3}
        mirrorPercentage: {value: 100}
      - name: slow
        match: [{uri: {prefix: /slow}}]
        rewrite: {uri: /delay/200}
        route: [{destination: {host: reviews, subset: guarded}}]
      - name: canary
        headers:
          request: {set: {x-route: canary}}
          response: {add: {x-mesh: waypoint}}
        corsPolicy: {allowOrigins: [{exact: 'https://app.example'}], allowMethods: [GET]}
        route:
          - {destination: {host: reviews, subset: v1}, weight: 80}
          - {destination: {host: reviews, subset: v2}, weight: 20}
    tcp:
      - route: [{destination: {host: reviews, subset: v3}}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata: {name: reviews-grpc, namespace: mesh}
  spec:
    parentRefs: [{group: '', kind: Service, name: reviews, port: 9081}]
    rules:
      - matches: [{method: {service: reviews.Reviews, method: Get}}]
        filters:
          - type: ResponseHeaderModifier
            responseHeaderModifier: {set: [{name: x-grpc-route, value: get}]}
        backendRefs: [{name: reviews, port: 9081}]
";

/// A route attached to the waypoint's Gateway for `reviews`: everything to v2, marked.
pub const ATTACHED_TO_WAYPOINT: &str = "
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: via-waypoint, namespace: mesh}
  spec:
    parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
    hostnames: [reviews]
    rules:
      - filters:
          - type: ResponseHeaderModifier
            responseHeaderModifier: {set: [{name: x-attached, value: waypoint}]}
        backendRefs: [{name: reviews-v2, port: 9080}]
";

/// L7 authorization at the waypoint (Istio's ambient tutorial's shape).
pub const VIEWER: &str = "
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: viewer, namespace: mesh}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    rules:
      - from: [{source: {principals: [cluster.local/ns/mesh/sa/sa-client]}}]
        to: [{operation: {methods: [GET]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-admin, namespace: mesh}
  spec:
    targetRefs: [{kind: Service, name: reviews}]
    action: DENY
    rules: [{to: [{operation: {paths: [/admin*]}}]}]
";
