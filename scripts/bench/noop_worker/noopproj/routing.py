from channels.routing import route


def noop(message):
    pass


channel_routing = [route("bench.noop", noop)]
