// swift-tools-version:6.0
import PackageDescription

/// The README's "Channel and Group from anywhere" example: a Hummingbird application, a process
/// of its own, that posts to the chat's rooms through the channel layer. A package of its own so
/// the libraries and the main examples do not build Hummingbird; `scripts/check-hummingbird.sh`
/// builds it and runs it against the chat example.
let package = Package(
    name: "swift-channels-hummingbird-example",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "Announce", targets: ["Announce"])
    ],
    dependencies: [
        .package(name: "swift-channels", path: "../.."),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.0.0"),
    ],
    targets: [
        .executableTarget(
            name: "Announce",
            dependencies: [
                .product(name: "ASGI", package: "swift-channels"),
                .product(name: "Channels", package: "swift-channels"),
                .product(name: "RedisChannelLayer", package: "swift-channels"),
                .product(name: "Hummingbird", package: "hummingbird"),
            ],
            swiftSettings: [
                .enableUpcomingFeature("ExistentialAny"),
                .enableUpcomingFeature("MemberImportVisibility"),
            ]
        )
    ],
    swiftLanguageModes: [.v6]
)
