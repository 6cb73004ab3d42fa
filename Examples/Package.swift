// swift-tools-version:6.0
import PackageDescription

/// The example applications, a package of their own so the libraries do not depend on what
/// they use (GRDB): `chat` is the tutorial's chat app, `PeerChat` the Swift twin of the Python
/// peers' app that `scripts/bench-server.sh` and `scripts/bench-fanout.sh` measure.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "swift-channels-examples",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "chat", targets: ["ChatExample"]),
        .executable(name: "PeerChat", targets: ["PeerChat"]),
    ],
    dependencies: [
        .package(name: "swift-channels", path: ".."),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
    ],
    targets: [
        .executableTarget(
            name: "ChatExample",
            dependencies: [
                .product(name: "ASGI", package: "swift-channels"),
                .product(name: "Channels", package: "swift-channels"),
                .product(name: "ChannelsCommand", package: "swift-channels"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "PeerChat",
            dependencies: [
                .product(name: "ASGI", package: "swift-channels"),
                .product(name: "Channels", package: "swift-channels"),
                .product(name: "ChannelsCommand", package: "swift-channels"),
            ],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
