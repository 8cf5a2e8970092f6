"""placeholder"""
class HookedCLIP: pass
