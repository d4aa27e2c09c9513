"""RaFFM core library: elastic specs, salience ordering, slicing, costs and aggregation maths. No servers here."""

__version__ = "0.1.0"
