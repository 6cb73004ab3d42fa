// swift-tools-version:6.1
import PackageDescription

/// Benchmarks, a package of their own so the libraries do not depend on what they use:
/// `ChannelLayer` runs on package-benchmark (`swift package --package-path Benchmarks benchmark`:
/// wall clock, throughput and mallocs per operation, baselines to compare against), and
/// `ChannelsBench` is the load generator `scripts/bench-layer.sh` and `scripts/bench-server.sh`
/// drive against Redis and the Python peers.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "swift-channels-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "swift-channels", path: ".."),
        .package(url: "https://github.com/ordo-one/package-benchmark.git", from: "1.38.0", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
    ],
    targets: [
        .executableTarget(
            name: "ChannelLayerBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "package-benchmark"),
                .product(name: "ASGI", package: "swift-channels"),
                .product(name: "RedisChannelLayer", package: "swift-channels"),
            ],
            path: "Benchmarks/ChannelLayer",
            swiftSettings: swiftSettings,
            plugins: [.plugin(name: "BenchmarkPlugin", package: "package-benchmark")]
        ),
        .executableTarget(
            name: "ChannelsBench",
            dependencies: [
                .product(name: "ASGI", package: "swift-channels"),
                .product(name: "RedisChannelLayer", package: "swift-channels"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "EchoShapes",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"), .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
