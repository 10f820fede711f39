"""gemmalab"""
