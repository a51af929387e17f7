"""Server side of fedpeft: the Flower ServerApp, its strategies, and the aggregation math.

`strategies.aggregation` holds pure functions on deltas (no Flower, no Ray), so it can be
imported and tested on its own. Nothing is imported here eagerly: importing this package must
not start Flower.
"""
